"""The shield's iptables rules in a lab gateway and container (root only)."""

from __future__ import annotations

import secrets
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from netfilterqueue import NetfilterQueue

from shieldproxy.kernel import rules
from shieldproxy.kernel.netns import enter_netns, run_in_netns
from shieldproxy.kernel.rules import (
    SHIELD_MARK,
    Family,
    RulesError,
    RuleSet,
    Scope,
    remove_leftover_chains,
    restore,
    save,
)
from shieldproxy.lab.topology import Lab, Role, lab

pytestmark = pytest.mark.lab

PORT = 5002
QUEUE = 7
# Seconds a connect gets when the rules should block it. Without rules it took
# about 1 ms in the lab, so a timeout here means the SYN was held back.
BLOCKED_TIMEOUT = 1.5
OPEN_TIMEOUT = 2.0


def new_tag() -> str:
    return "t" + secrets.token_hex(4)


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def ctr_address(running: Lab, version: Family) -> str:
    return running.ctr_v4 if version == 4 else running.ctr_v6


def gateway_scope(running: Lab, version: Family) -> Scope:
    return Scope(
        ctr_address(running, version),
        port=PORT,
        in_interface=running.gw_peer_if,
        out_interface=running.gw_ctr_if,
    )


def connects(
    running: Lab, role: Role, address: str, timeout: float, mark: int | None = None
) -> bool:
    """Return True if a TCP connect from ROLE to ADDRESS:PORT completes in time."""
    with running.enter(role):
        client = socket.socket(family_of(address), socket.SOCK_STREAM)
    with client:
        if mark is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        client.settimeout(timeout)
        try:
            client.connect((address, PORT))
        except TimeoutError:
            return False
    return True


def chain_lines(save_text: str, chain: str) -> list[str]:
    return [line for line in save_text.splitlines() if line.startswith(f"-A {chain} ")]


def sp_chains(netns: str) -> list[str]:
    found = []
    versions: tuple[Family, ...] = (4, 6)
    for version in versions:
        for line in save(netns, version).splitlines():
            if line.startswith(":SP-") or " SP-" in line:
                found.append(line)
    return found


def rule_packets(
    netns: str, version: Family, chain: str, target: str, contains: str = ""
) -> int:
    """Return the packet counter of CHAIN's first rule with TARGET and CONTAINS."""
    command = ["iptables-save" if version == 4 else "ip6tables-save", "-c"]
    output = run_in_netns(netns, command).stdout
    for line in output.splitlines():
        if f"-A {chain} " in line and f"-j {target}" in line and contains in line:
            return int(line.split("]", 1)[0].lstrip("[").split(":")[0])
    raise AssertionError(f"no {target} rule in {chain}:\n{output}")


@pytest.fixture
def running_lab() -> Iterator[Lab]:
    with lab() as created:
        yield created


@pytest.fixture
def servers(running_lab: Lab) -> Iterator[None]:
    """Listen on PORT at the container's IPv4 and IPv6 address."""
    sockets = []
    try:
        for address in (running_lab.ctr_v4, running_lab.ctr_v6):
            with running_lab.enter("ctr"):
                server = socket.socket(family_of(address), socket.SOCK_STREAM)
            sockets.append(server)
            server.bind((address, PORT))
            server.listen(64)
        yield
    finally:
        for server in sockets:
            server.close()


@pytest.mark.parametrize("version", [4, 6])
def test_queue_blocks_until_removed(
    running_lab: Lab, servers: None, version: Family
) -> None:
    address = ctr_address(running_lab, version)
    ruleset = RuleSet(
        new_tag(), [gateway_scope(running_lab, version)], QUEUE, netns=running_lab.gw_ns
    )
    assert connects(running_lab, "peer", address, OPEN_TIMEOUT)
    with ruleset:
        assert ruleset.action == "queue"
        text = save(running_lab.gw_ns, version)
        lines = chain_lines(text, ruleset.chain)
        assert len(lines) == 3
        assert lines[0] == f"-A {ruleset.chain} -m mark --mark 0xc114 -j RETURN"
        # the container's own packets are dropped while the rules are in place
        assert f"--sport {PORT}" in lines[2]
        assert f"-i {running_lab.gw_ctr_if}" in lines[2]
        assert f"-o {running_lab.gw_peer_if}" in lines[2]
        assert lines[2].endswith("-j DROP")
        assert f"--dport {PORT}" in lines[1]
        assert f"-i {running_lab.gw_peer_if}" in lines[1]
        assert f"-o {running_lab.gw_ctr_if}" in lines[1]
        assert lines[1].endswith(f"-j NFQUEUE --queue-num {QUEUE}")
        assert "bypass" not in text
        forward = [line for line in text.splitlines() if line.startswith("-A FORWARD")]
        assert forward[0] == f"-A FORWARD -j {ruleset.chain}"

        assert not connects(running_lab, "peer", address, BLOCKED_TIMEOUT)
        packets = rule_packets(running_lab.gw_ns, version, ruleset.chain, "NFQUEUE")
        assert packets >= 1
    assert ruleset.action is None
    assert sp_chains(running_lab.gw_ns) == []
    assert connects(running_lab, "peer", address, OPEN_TIMEOUT)


def test_queue_delivers_to_listener(running_lab: Lab, servers: None) -> None:
    seen: list[int] = []
    stop = threading.Event()

    def accept(packet: Any) -> None:
        seen.append(packet.get_payload_len())
        packet.accept()

    # NetfilterQueue() opens its netlink socket, so it must be created inside.
    with enter_netns(running_lab.gw_ns):
        queue = NetfilterQueue()
        queue.bind(QUEUE, accept)

    def serve() -> None:
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([queue.get_fd()], [], [], 0.05)
            if ready:
                queue.run(block=False)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        scope = gateway_scope(running_lab, 4)
        ruleset = RuleSet(new_tag(), [scope], QUEUE, netns=running_lab.gw_ns)
        with ruleset:
            # The accepted SYN reaches the container, whose SYN-ACK the rule
            # set drops: nothing of the container leaves while it is frozen.
            assert not connects(
                running_lab, "peer", running_lab.ctr_v4, BLOCKED_TIMEOUT
            )
            syn_acks = rule_packets(
                running_lab.gw_ns, 4, ruleset.chain, "DROP", f"--sport {PORT}"
            )
    finally:
        stop.set()
        worker.join(5)
        queue.unbind()
    assert len(seen) >= 1
    assert syn_acks >= 1


@pytest.mark.parametrize("version", [4, 6])
def test_drop_mode_drops(running_lab: Lab, servers: None, version: Family) -> None:
    address = ctr_address(running_lab, version)
    scope = gateway_scope(running_lab, version)
    ruleset = RuleSet(new_tag(), [scope], QUEUE, netns=running_lab.gw_ns)
    try:
        ruleset.install("drop")
        assert ruleset.action == "drop"
        text = save(running_lab.gw_ns, version)
        lines = chain_lines(text, ruleset.chain)
        assert len(lines) == 3
        assert lines[1].endswith("-j DROP")
        assert lines[2].endswith("-j DROP")
        assert "NFQUEUE" not in text
        assert not connects(running_lab, "peer", address, BLOCKED_TIMEOUT)
        assert rule_packets(running_lab.gw_ns, version, ruleset.chain, "DROP") >= 1
    finally:
        ruleset.remove()
    assert connects(running_lab, "peer", address, OPEN_TIMEOUT)


def test_switch_is_one_restore_per_family(
    running_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    scopes = [gateway_scope(running_lab, 4), gateway_scope(running_lab, 6)]
    calls: list[tuple[int, str]] = []
    real_restore = rules.restore

    def recording_restore(netns: str | None, family: Any, script: str) -> None:
        calls.append((family, script))
        real_restore(netns, family, script)

    monkeypatch.setattr(rules, "restore", recording_restore)
    with RuleSet(new_tag(), scopes, QUEUE, netns=running_lab.gw_ns) as ruleset:
        calls.clear()
        ruleset.switch("drop")
        assert [family for family, _ in calls] == [4, 6]
        for _, script in calls:
            assert f":{ruleset.chain} - [0:0]" in script
            assert "-j DROP" in script
            assert "-I FORWARD" not in script
            assert script.count("COMMIT") == 1
        for version in (4, 6):
            text = save(running_lab.gw_ns, version)
            lines = chain_lines(text, ruleset.chain)
            assert len(lines) == 3
            assert lines[1].endswith("-j DROP")
            assert text.count(f"-j {ruleset.chain}") == 1
        ruleset.switch("queue")
        text = save(running_lab.gw_ns, 4)
        assert chain_lines(text, ruleset.chain)[1].endswith(f"--queue-num {QUEUE}")


def test_switch_never_shows_partial_chain(running_lab: Lab) -> None:
    """Sample the chain while switching. Every sample must contain both rules."""
    scope = gateway_scope(running_lab, 4)
    partial: list[list[str]] = []
    samples = 0
    stop = threading.Event()
    with RuleSet(new_tag(), [scope], QUEUE, netns=running_lab.gw_ns) as ruleset:

        def sample() -> None:
            nonlocal samples
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                lines = chain_lines(save(running_lab.gw_ns, 4), ruleset.chain)
                samples += 1
                if len(lines) != 3:
                    partial.append(lines)

        worker = threading.Thread(target=sample)
        worker.start()
        try:
            for _ in range(15):
                ruleset.switch("drop")
                ruleset.switch("queue")
        finally:
            stop.set()
            worker.join(25)
    assert samples >= 5
    assert partial == []


def test_remove_twice_and_after_netns_gone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="shieldproxy.kernel.rules")
    with lab() as running:
        ruleset = RuleSet(
            new_tag(), [Scope(running.ctr_v4)], QUEUE, netns=running.gw_ns
        )
        ruleset.install()
        ruleset.remove()
        ruleset.remove()
        assert "already absent" in caplog.text
        ruleset.install()
    ruleset.remove()
    assert "no longer exists" in caplog.text


def test_install_twice_raises(running_lab: Lab) -> None:
    scope = Scope(running_lab.ctr_v4)
    with RuleSet(new_tag(), [scope], QUEUE, netns=running_lab.gw_ns) as ruleset:
        with pytest.raises(RulesError, match="already installed"):
            ruleset.install()
        text = save(running_lab.gw_ns, 4)
        assert text.count(f"-j {ruleset.chain}") == 1


def test_switch_before_install_raises(running_lab: Lab) -> None:
    ruleset = RuleSet(new_tag(), [Scope(running_lab.ctr_v4)], QUEUE)
    with pytest.raises(RulesError, match="not installed"):
        ruleset.switch("drop")


def test_context_removes_on_error(running_lab: Lab) -> None:
    scope = gateway_scope(running_lab, 6)
    with pytest.raises(KeyboardInterrupt):
        with RuleSet(new_tag(), [scope], QUEUE, netns=running_lab.gw_ns):
            raise KeyboardInterrupt
    assert sp_chains(running_lab.gw_ns) == []


def test_leftover_chains_removed(running_lab: Lab) -> None:
    gw = running_lab.gw_ns
    crashed = RuleSet(
        new_tag(),
        [gateway_scope(running_lab, 4), gateway_scope(running_lab, 6)],
        QUEUE,
        netns=gw,
    )
    crashed.install()
    other = "KEEP-" + secrets.token_hex(3)
    restore(gw, 4, f"*filter\n:{other} - [0:0]\n-A FORWARD -j {other}\nCOMMIT\n")
    try:
        removed = remove_leftover_chains(gw)
        assert sorted(removed) == [f"ipv4:{crashed.chain}", f"ipv6:{crashed.chain}"]
        assert sp_chains(gw) == []
        assert f":{other}" in save(gw, 4)
        assert remove_leftover_chains(gw) == []
    finally:
        crashed.remove()


def test_queue_balance_range(running_lab: Lab) -> None:
    scope = Scope(running_lab.ctr_v6, port=PORT)
    with RuleSet(new_tag(), [scope], (2, 5), netns=running_lab.gw_ns) as ruleset:
        lines = chain_lines(save(running_lab.gw_ns, 6), ruleset.chain)
    assert lines[1].endswith("-j NFQUEUE --queue-balance 2:5")


def test_sidecar_input_exempts_mark(running_lab: Lab, servers: None) -> None:
    scope = Scope(running_lab.ctr_v4, port=PORT)
    ruleset = RuleSet(new_tag(), [scope], QUEUE, hook="INPUT", netns=running_lab.ctr_ns)
    with ruleset:
        text = save(running_lab.ctr_ns, 4)
        assert f"-A INPUT -j {ruleset.chain}" in text
        assert f"-A OUTPUT -j {ruleset.chain}" in text
        assert not connects(running_lab, "peer", running_lab.ctr_v4, BLOCKED_TIMEOUT)
        queued = rule_packets(running_lab.ctr_ns, 4, ruleset.chain, "NFQUEUE")
        # Traffic inside the container namespace crosses INPUT with its mark
        # kept, so the marked SYN skips the queue. The listener's unmarked
        # SYN-ACK is the container's own packet and is dropped in OUTPUT.
        assert not connects(
            running_lab, "ctr", running_lab.ctr_v4, BLOCKED_TIMEOUT, mark=SHIELD_MARK
        )
        assert rule_packets(running_lab.ctr_ns, 4, ruleset.chain, "RETURN") >= 1
        assert rule_packets(running_lab.ctr_ns, 4, ruleset.chain, "NFQUEUE") == queued
        assert (
            rule_packets(running_lab.ctr_ns, 4, ruleset.chain, "DROP", "--sport") >= 1
        )
        assert not connects(running_lab, "ctr", running_lab.ctr_v4, BLOCKED_TIMEOUT)
    assert connects(running_lab, "peer", running_lab.ctr_v4, OPEN_TIMEOUT)


def test_restore_error_names_line(running_lab: Lab) -> None:
    script = "*filter\n-A NO-SUCH-CHAIN -j DROP\nCOMMIT\n"
    with pytest.raises(RulesError) as caught:
        restore(running_lab.gw_ns, 4, script)
    message = str(caught.value)
    assert "iptables-restore" in message
    assert "script line 2 failed: '-A NO-SUCH-CHAIN -j DROP'" in message
    assert "stderr:" in message


def test_install_missing_netns_raises() -> None:
    name = f"sp-{secrets.token_hex(3)}-gw"
    ruleset = RuleSet(new_tag(), [Scope("198.18.2.2")], QUEUE, netns=name)
    with pytest.raises(RulesError, match=name):
        ruleset.install()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tag": "x" * 26}, "invalid rule set tag"),
        ({"tag": "bad tag"}, "invalid rule set tag"),
        ({"queue": (5, 2)}, "invalid queue range"),
        ({"queue": 70000}, "invalid queue range"),
        ({"hook": "OUTPUT"}, "invalid hook"),
        ({"scopes": []}, "at least one scope"),
        (
            {"hook": "INPUT", "scopes": [Scope("198.18.2.2", out_interface="x")]},
            "out_interface",
        ),
    ],
)
def test_ruleset_rejects_invalid(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "tag": "valid",
        "scopes": [Scope("198.18.2.2")],
        "queue": 1,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RuleSet(**arguments)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"address": "198.18.2.300"},
        {"address": "198.18.2.2", "port": 0},
        {"address": "198.18.2.2", "in_interface": "a" * 16},
        {"address": "198.18.2.2", "in_interface": "eth0 -j ACCEPT"},
    ],
)
def test_scope_rejects_invalid(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        Scope(**kwargs)
