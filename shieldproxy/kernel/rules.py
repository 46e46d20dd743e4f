"""The shield's iptables rules: divert peer-to-container TCP into NFQUEUE or drop it.

Each ``RuleSet`` owns one chain ``SP-<tag>`` per address family in the filter table
and one jump to it at position 1 of the hook chain. Every change is a single
``iptables-restore --noflush`` transaction per family, so the kernel never sees a
half-installed, half-switched or half-removed rule set.

The NFQUEUE rules never use ``--queue-bypass``: with no process bound to the queue
the kernel drops the packets, so a dead shield fails closed instead of letting a
peer segment reach a namespace without the socket, which would answer with RST.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from shieldproxy.kernel.netns import (
    NetnsCommandError,
    netns_path,
    run_command,
)

log = logging.getLogger(__name__)

Family = Literal[4, 6]
Hook = Literal["FORWARD", "INPUT"]
# "queue" and "drop" also drop the container's own packets to its peers, as
# CRIU's lock does. "queue-in" queues the peers' packets but lets the container's
# out, for the moment a restored socket starts answering for itself.
Action = Literal["queue", "drop", "queue-in"]

# Packets with this mark bypass the shield's chain. The shield's own raw-socket
# segments carry it, and CRIU's network lock lets the same mark through.
SHIELD_MARK = 0xC114

CHAIN_PREFIX = "SP-"
# iptables 1.8.9 rejects chain names of 29 characters or more.
MAX_CHAIN_LEN = 28
_TAG_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Linux interface names have at most 15 bytes and no '/', ':' or whitespace. The
# pattern is narrower so that a name can never break the restore script, but it
# allows iptables' trailing '+' wildcard.
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}\+?$")
_LINE_FAILED_RE = re.compile(r"line (\d+) failed")
_COMMAND_TIMEOUT = 30.0

_RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
_SAVE = {4: "iptables-save", 6: "ip6tables-save"}


class RulesError(RuntimeError):
    """An iptables command failed or a rule set is invalid."""


@dataclass(frozen=True)
class Scope:
    """Peer-to-container TCP traffic that one rule matches.

    Attributes:
        address: container address or network, IPv4 or IPv6 (``198.18.2.2`` or
            ``198.18.2.0/24``). It sets the rule's address family.
        port: container TCP port (``--dport``), or None for every port.
        in_interface: interface the peer's packets arrive on (``-i``).
        out_interface: interface they leave towards the container (``-o``);
            only valid with the FORWARD hook.
    """

    address: str
    port: int | None = None
    in_interface: str | None = None
    out_interface: str | None = None

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_network(self.address, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"invalid scope address {self.address!r} ({exc}): "
                "give an IPv4 or IPv6 address or network"
            ) from None
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"invalid scope port {self.port}: use 1-65535 or None")
        for iface in (self.in_interface, self.out_interface):
            if iface is not None and not _IFACE_RE.fullmatch(iface):
                raise ValueError(
                    f"invalid interface name {iface!r}: use at most 15 letters, "
                    "digits, '_', '.', '@' or '-', optionally ending in '+'"
                )

    @property
    def family(self) -> Family:
        """IP version of the address: 4 or 6."""
        return 4 if ipaddress.ip_network(self.address).version == 4 else 6

    def outbound_match_args(self, hook: Hook) -> str:
        """Return the match arguments for the container's packets to its peers.

        With the INPUT hook these packets pass the OUTPUT chain, where ``-i``
        does not exist, so only the address and port are matched there.
        """
        parts = ["-p tcp", f"-s {ipaddress.ip_network(self.address)}"]
        if self.port is not None:
            parts.append(f"--sport {self.port}")
        if hook == "FORWARD":
            if self.out_interface is not None:
                parts.append(f"-i {self.out_interface}")
            if self.in_interface is not None:
                parts.append(f"-o {self.in_interface}")
        return " ".join(parts)

    def match_args(self) -> str:
        """Return the iptables match arguments for this scope."""
        parts = ["-p tcp", f"-d {ipaddress.ip_network(self.address)}"]
        if self.port is not None:
            parts.append(f"--dport {self.port}")
        if self.in_interface is not None:
            parts.append(f"-i {self.in_interface}")
        if self.out_interface is not None:
            parts.append(f"-o {self.out_interface}")
        return " ".join(parts)


def chain_name(tag: str) -> str:
    """Return the chain name ``SP-<tag>`` for TAG.

    Raises:
        ValueError: TAG is empty, has characters other than letters, digits,
            ``_`` and ``-``, or makes the name longer than 28 characters.
    """
    name = CHAIN_PREFIX + tag
    if not _TAG_RE.fullmatch(tag) or len(name) > MAX_CHAIN_LEN:
        raise ValueError(
            f"invalid rule set tag {tag!r}: use 1-{MAX_CHAIN_LEN - len(CHAIN_PREFIX)} "
            "letters, digits, '_' or '-'"
        )
    return name


def _run(
    argv: Sequence[str], netns: str | None, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return run_command(
            argv,
            netns=netns,
            check=False,
            timeout=_COMMAND_TIMEOUT,
            input=input_text,
        )
    except NetnsCommandError as exc:
        if exc.returncode == 127:
            raise RulesError(f"{exc}: install iptables and util-linux") from None
        raise RulesError(str(exc)) from None


def _numbered(script: str) -> str:
    lines = script.splitlines()
    return "\n".join(f"{number:3d}: {line}" for number, line in enumerate(lines, 1))


def restore(netns: str | None, family: Family, script: str) -> None:
    """Apply SCRIPT with ``iptables-restore --noflush`` as one transaction.

    Args:
        netns: name under /run/netns, or None for the caller's namespace.
        family: 4 runs iptables-restore, 6 runs ip6tables-restore.

    Raises:
        RulesError: the command failed, and none of SCRIPT is applied. The
            message contains the command, the failing script line and stderr.
    """
    argv = [_RESTORE[family], "--noflush"]
    result = _run(argv, netns, script)
    if result.returncode == 0:
        return
    stderr = result.stderr.strip()
    message = f"command {argv} in {_where(netns)} exited {result.returncode}"
    failed = _LINE_FAILED_RE.search(stderr)
    lines = script.splitlines()
    if failed is not None and 1 <= int(failed.group(1)) <= len(lines):
        number = int(failed.group(1))
        message += f"; script line {number} failed: {lines[number - 1]!r}"
    message += f"\nstderr: {stderr or '(empty)'}\nscript:\n{_numbered(script)}"
    raise RulesError(message)


def save(netns: str | None, family: Family) -> str:
    """Return the filter table as ``iptables-save -t filter`` prints it.

    Raises:
        RulesError: the command failed.
    """
    argv = [_SAVE[family], "-t", "filter"]
    result = _run(argv, netns)
    if result.returncode != 0:
        raise RulesError(
            f"command {argv} in {_where(netns)} exited {result.returncode}: "
            f"{result.stderr.strip() or '(no stderr)'}"
        )
    return result.stdout


def _where(netns: str | None) -> str:
    return "the current network namespace" if netns is None else f"netns {netns!r}"


def _chains_in(save_text: str) -> list[str]:
    return [
        line[1:].split()[0]
        for line in save_text.splitlines()
        if line.startswith(":") and len(line) > 1
    ]


def _removal_script(save_text: str, chains: Iterable[str]) -> str | None:
    """Build a restore script that deletes CHAINS and every jump into them.

    Jumps from other chains are deleted by their exact ``iptables-save`` spec,
    and rules inside CHAINS go away with the flush. Returns None when none of CHAINS
    exists and nothing jumps to them.
    """
    doomed = set(chains)
    present = [chain for chain in _chains_in(save_text) if chain in doomed]
    deletes: list[str] = []
    for line in save_text.splitlines():
        if not line.startswith("-A "):
            continue
        fields = line.split()
        if len(fields) < 2 or fields[1] in doomed:
            continue
        targets = {
            fields[i + 1]
            for i, field in enumerate(fields[:-1])
            if field in ("-j", "-g", "--jump", "--goto")
        }
        if targets & doomed:
            deletes.append("-D " + line[3:])
    if not present and not deletes:
        return None
    body = deletes + [f"-F {c}" for c in present] + [f"-X {c}" for c in present]
    return "*filter\n" + "\n".join(body) + "\nCOMMIT\n"


def _netns_exists(netns: str | None) -> bool:
    return netns is None or netns_path(netns).exists()


def remove_leftover_chains(
    netns: str | None,
    tag_prefix: str = CHAIN_PREFIX,
    keep: Collection[str] = (),
) -> list[str]:
    """Delete every filter chain whose name starts with TAG_PREFIX, and its jumps.

    Chains named in KEEP stay, for rule sets a restarted process adopts.

    Meant for cleanup after a crash, so it also removes chains of other rule sets,
    including those of another shield still running in the same namespace.

    Returns:
        The removed chains as ``"ipv4:SP-tag"`` / ``"ipv6:SP-tag"``.

    Raises:
        RulesError: reading or changing the rules failed.
    """
    if not tag_prefix:
        raise ValueError("tag_prefix must not be empty: it would match every chain")
    removed: list[str] = []
    families: tuple[Family, ...] = (4, 6)
    for family in families:
        text = save(netns, family)
        chains = [
            c for c in _chains_in(text) if c.startswith(tag_prefix) and c not in keep
        ]
        script = _removal_script(text, chains)
        if script is None:
            continue
        restore(netns, family, script)
        removed.extend(f"ipv{family}:{chain}" for chain in chains)
    if removed:
        log.info("removed leftover chains in %s: %s", _where(netns), removed)
    return removed


class RuleSet:
    """The shield's chain for a set of scopes in one network namespace.

    Usable as a context manager: entering installs the rules in queue mode unless
    already installed, and leaving removes them, also when the block raises.
    """

    def __init__(
        self,
        tag: str,
        scopes: Sequence[Scope],
        queue: int | tuple[int, int],
        *,
        hook: Hook = "FORWARD",
        netns: str | None = None,
    ) -> None:
        """Validate the rule set; nothing touches the kernel until install().

        Args:
            tag: unique name part, the chain is ``SP-<tag>``.
            scopes: traffic to match, IPv4 and IPv6 may be mixed.
            queue: NFQUEUE number, or an inclusive (first, last) range that the
                kernel balances flows across.
            hook: "FORWARD" for a gateway, "INPUT" for a sidecar.
            netns: name under /run/netns, or None for the caller's namespace.
        """
        self.chain = chain_name(tag)
        self.tag = tag
        if not scopes:
            raise ValueError("a rule set needs at least one scope")
        if hook not in ("FORWARD", "INPUT"):
            raise ValueError(f"invalid hook {hook!r}: use 'FORWARD' or 'INPUT'")
        if hook == "INPUT" and any(s.out_interface is not None for s in scopes):
            raise ValueError(
                "out_interface is not valid with the INPUT hook: "
                "iptables matches -o only in FORWARD, OUTPUT and POSTROUTING"
            )
        first, last = (queue, queue) if isinstance(queue, int) else queue
        if not 0 <= first <= last <= 65535:
            raise ValueError(
                f"invalid queue range {queue!r}: need 0 <= first <= last <= 65535"
            )
        if netns is not None:
            netns_path(netns)
        self.scopes = tuple(scopes)
        self.queue_first = first
        self.queue_last = last
        self.hook: Hook = hook
        self.netns = netns
        self.families: tuple[Family, ...] = tuple(
            f for f in (4, 6) if any(s.family == f for s in self.scopes)
        )
        self._action: Action | None = None

    def adopt(self, action: Action) -> None:
        """Take over this rule set's chain as an earlier process left it.

        Nothing changes in the kernel; afterwards :meth:`switch` and
        :meth:`remove` work as if this object had installed the chain.
        """
        self._action = action
        log.info(
            "adopted rules %s in %s: action %s", self.chain, _where(self.netns), action
        )

    @property
    def action(self) -> Action | None:
        """Current action, or None when the rules are not installed."""
        return self._action

    def _target(self, action: Action) -> str:
        if action == "drop":
            return "-j DROP"
        if self.queue_first == self.queue_last:
            return f"-j NFQUEUE --queue-num {self.queue_first}"
        return f"-j NFQUEUE --queue-balance {self.queue_first}:{self.queue_last}"

    def _chain_rules(self, family: Family, action: Action) -> list[str]:
        # The chain declaration creates the chain, or flushes it when it exists
        # (iptables-restore --noflush), so the same lines install and switch.
        lines = [
            f":{self.chain} - [0:0]",
            f"-A {self.chain} -m mark --mark {SHIELD_MARK:#x} -j RETURN",
        ]
        target = self._target(action)
        for scope in self.scopes:
            if scope.family == family:
                lines.append(f"-A {self.chain} {scope.match_args()} {target}")
                if action == "queue-in":
                    continue
                # While frozen the container's own packets are dropped, as CRIU's
                # lock does. A socket in repair mode still sends delayed ACKs,
                # and one sent after the dump can show a larger right edge than
                # the dump recorded, which the shield's ACKs would then retract.
                outbound = scope.outbound_match_args(self.hook)
                lines.append(f"-A {self.chain} {outbound} -j DROP")
        return lines

    def script(self, family: Family, action: Action, *, with_jump: bool) -> str:
        """Return the restore script that installs or switches the chain."""
        lines = ["*filter", *self._chain_rules(family, action)]
        if with_jump:
            lines.append(f"-I {self.hook} 1 -j {self.chain}")
            if self.hook == "INPUT":
                # the container's own packets leave a sidecar's namespace here
                lines.append(f"-I OUTPUT 1 -j {self.chain}")
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def install(self, action: Action = "queue") -> None:
        """Create the chain and insert the jump at position 1 of the hook chain.

        Raises:
            RulesError: iptables failed, or the rule set is already installed.
                When the second family fails, the first is removed again.
        """
        if self._action is not None:
            raise RulesError(
                f"rule set {self.chain} is already installed in {_where(self.netns)}"
            )
        self._check_netns()
        done: list[Family] = []
        try:
            for family in self.families:
                restore(self.netns, family, self.script(family, action, with_jump=True))
                done.append(family)
        except BaseException:
            for family in done:
                try:
                    self._remove_family(family)
                except RulesError:
                    log.exception(
                        "removing %s IPv%d after a failed install failed",
                        self.chain,
                        family,
                    )
            raise
        self._action = action
        log.info(
            "installed rules %s in %s hook %s: action %s, %d scopes",
            self.chain,
            _where(self.netns),
            self.hook,
            action,
            len(self.scopes),
        )

    def switch(self, action: Action) -> None:
        """Replace the chain's rules with ACTION, one transaction per family.

        Raises:
            RulesError: the rule set is not installed or iptables failed. When
                the second family fails, the first is switched back.
        """
        previous = self._action
        if previous is None:
            raise RulesError(
                f"rule set {self.chain} is not installed in {_where(self.netns)}: "
                "call install() first"
            )
        done: list[Family] = []
        try:
            for family in self.families:
                restore(
                    self.netns, family, self.script(family, action, with_jump=False)
                )
                done.append(family)
        except BaseException:
            for family in done:
                try:
                    restore(
                        self.netns,
                        family,
                        self.script(family, previous, with_jump=False),
                    )
                except RulesError:
                    log.exception(
                        "switching %s IPv%d back to %s failed",
                        self.chain,
                        family,
                        previous,
                    )
            raise
        self._action = action
        log.info(
            "switched rules %s in %s from %s to %s",
            self.chain,
            _where(self.netns),
            previous,
            action,
        )

    def remove(self) -> None:
        """Delete the jump and the chain, whatever this object believes is there.

        Does nothing, and logs, when the chain is already gone or the namespace no
        longer exists.

        Raises:
            RulesError: the chain exists but could not be read or removed.
        """
        self._action = None
        if not _netns_exists(self.netns):
            log.warning(
                "rules %s not removed: netns %r no longer exists",
                self.chain,
                self.netns,
            )
            return
        removed = [family for family in self.families if self._remove_family(family)]
        if removed:
            log.info(
                "removed rules %s from %s (IPv%s)",
                self.chain,
                _where(self.netns),
                "+".join(map(str, removed)),
            )
        else:
            log.info("rules %s already absent from %s", self.chain, _where(self.netns))

    def _remove_family(self, family: Family) -> bool:
        script = _removal_script(save(self.netns, family), [self.chain])
        if script is None:
            return False
        restore(self.netns, family, script)
        return True

    def _check_netns(self) -> None:
        if not _netns_exists(self.netns):
            raise RulesError(
                f"network namespace {self.netns!r} not found: "
                f"{netns_path(self.netns or '')} does not exist"
            )

    def __enter__(self) -> RuleSet:
        if self._action is None:
            self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
