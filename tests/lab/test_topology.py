"""Lab topology and namespace helpers on real network namespaces (root only)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from shieldproxy.kernel.netns import (
    NetnsCommandError,
    NetnsError,
    enter_netns,
    netns_command,
    run_in_netns,
)
from shieldproxy.lab import topology
from shieldproxy.lab.topology import Lab, LabError, Role, lab, lab_down, lab_up, sysctl

pytestmark = pytest.mark.lab

PORT = 5001
TIMEOUT = 2.0


def netns_names() -> list[str]:
    output = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def root_links() -> list[str]:
    output = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in output.splitlines()]


def lab_leftovers(lab_id: str) -> list[str]:
    names = [n for n in netns_names() if n.startswith(f"sp-{lab_id}-")]
    links = [n for n in root_links() if n.startswith(f"sp{lab_id}")]
    return names + links


def unused_lab_id() -> str:
    for _ in range(16):
        lab_id = secrets.token_hex(3)
        if not lab_leftovers(lab_id):
            return lab_id
    raise AssertionError("no unused lab id in 16 tries")


def thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def listen(running: Lab, role: Role, address: str) -> socket.socket:
    with running.enter(role):
        server = socket.socket(family_of(address), socket.SOCK_STREAM)
    server.settimeout(TIMEOUT)
    server.bind((address, PORT))
    server.listen(8)
    return server


def exchange(
    running: Lab,
    role: Role,
    server: socket.socket,
    address: str,
    source: str | None = None,
) -> str:
    """Connect from ROLE to ADDRESS, swap one message each way, return peer host."""
    with running.enter(role):
        client = socket.socket(family_of(address), socket.SOCK_STREAM)
    with client:
        client.settimeout(TIMEOUT)
        if source is not None:
            client.bind((source, 0))
        client.connect((address, PORT))
        accepted, remote = server.accept()
        with accepted:
            accepted.settimeout(TIMEOUT)
            client.sendall(b"ping")
            assert accepted.recv(16) == b"ping"
            accepted.sendall(b"pong")
            assert client.recv(16) == b"pong"
    return str(remote[0])


@pytest.fixture
def running_lab() -> Iterator[Lab]:
    with lab() as created:
        yield created


@pytest.mark.parametrize("version", [4, 6])
def test_peer_reaches_ctr_over_tcp(running_lab: Lab, version: int) -> None:
    address = running_lab.ctr_v4 if version == 4 else running_lab.ctr_v6
    expected = running_lab.peer_v4 if version == 4 else running_lab.peer_v6
    with listen(running_lab, "ctr", address) as server:
        assert exchange(running_lab, "peer", server, address) == expected


def test_ctr_reaches_peer_over_tcp(running_lab: Lab) -> None:
    with listen(running_lab, "peer", running_lab.peer_v6) as server:
        remote = exchange(running_lab, "ctr", server, running_lab.peer_v6)
    assert remote == running_lab.ctr_v6


def test_lab_names_and_addresses(running_lab: Lab) -> None:
    lab_id = running_lab.lab_id
    assert running_lab.namespaces == (
        f"sp-{lab_id}-gw",
        f"sp-{lab_id}-peer",
        f"sp-{lab_id}-ctr",
    )
    for name in (
        running_lab.peer_if,
        running_lab.gw_peer_if,
        running_lab.ctr_if,
        running_lab.gw_ctr_if,
    ):
        assert name.startswith(f"sp{lab_id}")
        assert len(name) <= 15
    assert running_lab.gw_peer_v4 == "198.18.1.1"
    assert running_lab.peer_v4 == "198.18.1.2"
    assert running_lab.gw_ctr_v4 == "198.18.2.1"
    assert running_lab.ctr_v4 == "198.18.2.2"
    assert running_lab.peer_v6 == "2001:2:0:1::2"
    assert running_lab.ctr_v6 == "2001:2:0:2::2"
    assert running_lab.atk_ns is None


@pytest.mark.parametrize("role", ["peer", "ctr"])
def test_routes_cover_only_lab_ranges(running_lab: Lab, role: Role) -> None:
    v4 = running_lab.run(role, ["ip", "-4", "route", "show"]).stdout
    v6 = running_lab.run(role, ["ip", "-6", "route", "show"]).stdout
    gw_v4 = running_lab.gw_peer_v4 if role == "peer" else running_lab.gw_ctr_v4
    gw_v6 = running_lab.gw_peer_v6 if role == "peer" else running_lab.gw_ctr_v6
    assert "default" not in v4
    assert "default" not in v6
    assert f"198.18.0.0/15 via {gw_v4} " in v4
    assert f"2001:2::/48 via {gw_v6} " in v6


def test_gateway_forwards_and_others_do_not(running_lab: Lab) -> None:
    def read(role: Role, path: str) -> str:
        return running_lab.run(role, ["cat", path]).stdout.strip()

    assert read("gw", "/proc/sys/net/ipv4/ip_forward") == "1"
    assert read("gw", "/proc/sys/net/ipv6/conf/all/forwarding") == "1"
    assert read("peer", "/proc/sys/net/ipv4/ip_forward") == "0"
    assert read("ctr", "/proc/sys/net/ipv4/ip_forward") == "0"


def test_lab_record_while_up(running_lab: Lab) -> None:
    path = topology.RECORD_DIR / f"{running_lab.lab_id}.json"
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid()
    assert record["lab"]["gw_ns"] == running_lab.gw_ns


def test_extra_peer_addresses_and_attacker() -> None:
    with lab(extra_peer_addresses=2, attacker=True) as running:
        assert running.extra_peer_v4 == ("198.18.1.3", "198.18.1.4")
        assert running.extra_peer_v6 == ("2001:2:0:1::3", "2001:2:0:1::4")
        assert running.atk_ns == f"sp-{running.lab_id}-atk"
        assert running.atk_v4 == "198.18.3.2"
        assert running.atk_v6 == "2001:2:0:3::2"
        with listen(running, "ctr", running.ctr_v4) as server:
            for source in running.extra_peer_v4:
                remote = exchange(running, "peer", server, running.ctr_v4, source)
                assert remote == source
            assert running.atk_v4 is not None
            remote = exchange(running, "atk", server, running.ctr_v4)
            assert remote == running.atk_v4
        with listen(running, "ctr", running.ctr_v6) as server:
            source = running.extra_peer_v6[1]
            remote = exchange(running, "peer", server, running.ctr_v6, source)
            assert remote == source
            assert exchange(running, "atk", server, running.ctr_v6) == running.atk_v6
    assert lab_leftovers(running.lab_id) == []


def test_second_container_reachable() -> None:
    with lab(second_container=True) as running:
        assert running.ctr2_ns == f"sp-{running.lab_id}-ctr2"
        assert running.netns("ctr2") == running.ctr2_ns
        assert running.ctr2_v4 == "198.18.4.2"
        assert running.ctr2_v6 == "2001:2:0:4::2"
        pairs = [(running.ctr2_v4, running.peer_v4), (running.ctr2_v6, running.peer_v6)]
        for address, peer_address in pairs:
            assert address is not None
            with listen(running, "ctr2", address) as server:
                assert exchange(running, "peer", server, address) == peer_address
        # the two containers reach each other only through the gateway
        with listen(running, "ctr", running.ctr_v4) as server:
            assert exchange(running, "ctr2", server, running.ctr_v4) == "198.18.4.2"
    assert lab_leftovers(running.lab_id) == []


def test_lab_down_removes_everything() -> None:
    with lab(attacker=True, second_container=True) as running:
        assert len(lab_leftovers(running.lab_id)) == 5
    assert lab_leftovers(running.lab_id) == []
    assert not (topology.RECORD_DIR / f"{running.lab_id}.json").exists()
    assert lab_down(running.lab_id) == []


def test_lab_down_after_crash() -> None:
    lab_id = unused_lab_id()
    name = f"sp-{lab_id}-gw"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = lab_down(lab_id)
        assert removed == [name]
        assert name not in netns_names()
    finally:
        if name in netns_names():
            subprocess.run(["ip", "netns", "delete", name], check=False)


def test_lab_up_failure_removes_created(monkeypatch: pytest.MonkeyPatch) -> None:
    lab_id = unused_lab_id()
    calls = 0
    real_connect = topology._connect

    def connect_then_fail(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise LabError("simulated failure")
        real_connect(*args)

    monkeypatch.setattr(topology, "_connect", connect_then_fail)
    try:
        with pytest.raises(LabError, match="simulated failure"):
            lab_up(lab_id=lab_id)
        assert calls == 2
        assert lab_leftovers(lab_id) == []
        assert not (topology.RECORD_DIR / f"{lab_id}.json").exists()
    finally:
        lab_down(lab_id)


def test_lab_up_interrupt_removes_created(monkeypatch: pytest.MonkeyPatch) -> None:
    lab_id = unused_lab_id()

    def interrupt(lab: Lab, timeout: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(topology, "_wait_ready", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            lab_up(lab_id=lab_id)
        assert lab_leftovers(lab_id) == []
    finally:
        lab_down(lab_id)


def test_lab_context_removes_on_interrupt() -> None:
    seen: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with lab() as running:
            seen.append(running.lab_id)
            raise KeyboardInterrupt
    assert len(seen) == 1
    assert lab_leftovers(seen[0]) == []


def test_lab_up_rejects_used_id(running_lab: Lab) -> None:
    with pytest.raises(LabError, match=running_lab.lab_id):
        lab_up(lab_id=running_lab.lab_id)
    assert len(lab_leftovers(running_lab.lab_id)) == 3


def test_two_labs_do_not_collide() -> None:
    with lab() as first, lab() as second:
        assert first.lab_id != second.lab_id
        assert set(first.namespaces).isdisjoint(second.namespaces)
        for running in (first, second):
            with listen(running, "ctr", running.ctr_v4) as server:
                remote = exchange(running, "peer", server, running.ctr_v4)
                assert remote == running.peer_v4
    assert lab_leftovers(first.lab_id) == []
    assert lab_leftovers(second.lab_id) == []


def test_enter_netns_is_per_thread(running_lab: Lab) -> None:
    before = thread_netns_inode()
    entered = threading.Event()
    other_thread: list[int] = []

    def measure() -> None:
        if entered.wait(TIMEOUT):
            other_thread.append(thread_netns_inode())

    worker = threading.Thread(target=measure)
    worker.start()
    try:
        with enter_netns(running_lab.ctr_ns):
            inside = thread_netns_inode()
            entered.set()
            worker.join(TIMEOUT)
    finally:
        entered.set()
        worker.join(TIMEOUT)
    assert inside != before
    assert other_thread == [before]
    assert thread_netns_inode() == before


def test_enter_netns_restores_after_error(running_lab: Lab) -> None:
    before = thread_netns_inode()
    with pytest.raises(RuntimeError, match="inside"):
        with enter_netns(running_lab.peer_ns):
            raise RuntimeError("inside")
    assert thread_netns_inode() == before


def test_enter_netns_missing_names_namespace() -> None:
    name = f"sp-{unused_lab_id()}-peer"
    with pytest.raises(NetnsError, match=name):
        with enter_netns(name):
            pass


def test_enter_netns_rejects_path_names() -> None:
    with pytest.raises(ValueError, match="invalid network namespace name"):
        with enter_netns("../netns"):
            pass


def test_netns_command_format() -> None:
    assert netns_command("sp-abc123-ctr", ["sleep", "1"]) == [
        "nsenter",
        "--net=/run/netns/sp-abc123-ctr",
        "sleep",
        "1",
    ]
    assert netns_command("x", ["true"], new_session=True) == [
        "nsenter",
        "--net=/run/netns/x",
        "setsid",
        "true",
    ]


def test_run_in_netns_error_has_stderr(running_lab: Lab) -> None:
    argv = ["sh", "-c", "echo lab-stderr-text >&2; exit 3"]
    with pytest.raises(NetnsCommandError) as caught:
        run_in_netns(running_lab.ctr_ns, argv)
    assert caught.value.returncode == 3
    assert "lab-stderr-text" in str(caught.value)
    assert "exit 3" in str(caught.value)


def test_run_in_netns_unchecked(running_lab: Lab) -> None:
    result = run_in_netns(running_lab.ctr_ns, ["sh", "-c", "exit 4"], check=False)
    assert result.returncode == 4


def test_popen_runs_in_namespace(running_lab: Lab) -> None:
    process = running_lab.popen(
        "ctr",
        ["ip", "-o", "link", "show"],
        new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0
    assert running_lab.ctr_if in output
    assert running_lab.peer_if not in output


def test_sysctl_sets_namespace_value(running_lab: Lab) -> None:
    # A per-interface key exists only inside the lab namespace, so a sysctl()
    # that failed to switch namespaces raises instead of changing the host.
    key = f"net.ipv4.conf.{running_lab.ctr_if}.forwarding"
    path = "/proc/sys/" + key.replace(".", "/")
    assert running_lab.run("ctr", ["cat", path]).stdout == "0\n"
    sysctl(running_lab.ctr_ns, key, 1)
    assert running_lab.run("ctr", ["cat", path]).stdout == "1\n"


def test_sysctl_unknown_key_fails(running_lab: Lab) -> None:
    with pytest.raises(LabError, match="net.ipv4.no_such_key"):
        sysctl(running_lab.ctr_ns, "net.ipv4.no_such_key", 1)
