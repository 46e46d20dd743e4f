"""Lab topology: peer, gateway and container network namespaces joined by veths.

::

    peer (198.18.1.2) --- (198.18.1.1) gw (198.18.2.1) --- (198.18.2.2) ctr
    atk  (198.18.3.2) --- (198.18.3.1) gw                  [attacker=True]
                          (198.18.4.1) gw (198.18.4.2) ctr2 [second_container=True]

IPv6 mirrors it in 2001:2:0:N::/64. Peer, container and attacker reach each other
only through the gateway, and have routes for 198.18.0.0/15 and 2001:2::/48 only,
so no lab packet can leave towards any other address.

Each lab has a random 6-hex id. Its namespaces are
``sp-<id>-{peer,gw,ctr,atk,ctr2}`` and its veths ``sp<id>{p,c,a,d}{0,1}``, where
0 is the end in the outer namespace and 1 the end in the gateway. The veths are
created directly inside the lab namespaces, so deleting the namespaces deletes
them. A JSON record of each lab in ``/run/shieldproxy/labs`` lets ``lab_down_all``
find labs of crashed runs.

The record also names the lab's owner: the process that created it, with its
start time, and the lab's lifetime. A ``process`` lab belongs to that process
(the ``lab()`` context manager, the demo, the tests), and when the process has
exited without removing it, for example after SIGKILL, the next ``lab_up`` of
any process removes it. A ``persistent`` lab (``shieldproxy lab up``) stays
until ``lab_down``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from shieldproxy.kernel.netns import (
    NetnsCommandError,
    enter_netns,
    netns_command,
    run_command,
    run_in_netns,
)
from shieldproxy.lab.records import (
    Lifetime,
    current_owner,
    own_pid_namespace,
    owner_from_record,
    read_lab_record,
    read_process,
    stale_reason,
)

log = logging.getLogger(__name__)

Role = Literal["peer", "gw", "ctr", "atk", "ctr2"]

RECORD_DIR = Path("/run/shieldproxy/labs")
NETNS_PREFIX = "sp-"
LINK_PREFIX = "sp"
MAX_EXTRA_PEER_ADDRESSES = 250
_ID_RE = re.compile(r"^[0-9a-f]{6}$")
_LAB_NETNS_RE = re.compile(r"^sp-([0-9a-f]{6})-(peer|gw|ctr|atk|ctr2)$")
_COMMAND_TIMEOUT = 30.0
# Seconds lab_up waits for another process's removal of stale labs to finish
# before it skips its own. Removing one lab takes well under 1 s.
REAP_LOCK_TIMEOUT = 30.0
# Seconds the removal of a stale lab waits for the processes it killed in the
# lab's namespaces to exit.
KILL_WAIT_TIMEOUT = 5.0
# Seconds lab_up waits for carrier on the veths. It took under 0.1 s here.
READY_TIMEOUT = 10.0

# Only the benchmarking ranges (RFC 2544 and RFC 5180) are routed in a lab.
LAB_NET_V4 = "198.18.0.0/15"
LAB_NET_V6 = "2001:2::/48"


class LabError(RuntimeError):
    """Creating or removing a lab failed."""


@dataclass(frozen=True)
class Lab:
    """Names and addresses of one running lab.

    Interface names ending in 0 are in the peer, container or attacker namespace,
    those ending in 1 are their gateway ends. Attacker fields are None unless the
    lab was created with ``attacker=True``, and second-container (ctr2) fields
    are None unless it was created with ``second_container=True``.
    """

    lab_id: str
    peer_ns: str
    gw_ns: str
    ctr_ns: str
    atk_ns: str | None

    peer_if: str
    gw_peer_if: str
    ctr_if: str
    gw_ctr_if: str
    atk_if: str | None
    gw_atk_if: str | None

    peer_v4: str
    peer_v6: str
    gw_peer_v4: str
    gw_peer_v6: str
    gw_ctr_v4: str
    gw_ctr_v6: str
    ctr_v4: str
    ctr_v6: str
    extra_peer_v4: tuple[str, ...] = ()
    extra_peer_v6: tuple[str, ...] = ()
    atk_v4: str | None = None
    atk_v6: str | None = None
    gw_atk_v4: str | None = None
    gw_atk_v6: str | None = None
    ctr2_ns: str | None = None
    ctr2_if: str | None = None
    gw_ctr2_if: str | None = None
    ctr2_v4: str | None = None
    ctr2_v6: str | None = None
    gw_ctr2_v4: str | None = None
    gw_ctr2_v6: str | None = None

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Namespace names of this lab, gateway first."""
        names = (self.gw_ns, self.peer_ns, self.ctr_ns, self.atk_ns, self.ctr2_ns)
        return tuple(name for name in names if name is not None)

    def netns(self, role: Role) -> str:
        """Return the namespace name of ROLE.

        Raises:
            ValueError: ROLE is unknown, or names a namespace this lab lacks.
        """
        names: dict[str, str | None] = {
            "peer": self.peer_ns,
            "gw": self.gw_ns,
            "ctr": self.ctr_ns,
            "atk": self.atk_ns,
            "ctr2": self.ctr2_ns,
        }
        name = names.get(role)
        if name is None:
            raise ValueError(
                f"lab {self.lab_id} has no namespace for role {role!r}: use one of "
                f"{[r for r, n in names.items() if n is not None]}"
            )
        return name

    @contextmanager
    def enter(self, role: Role) -> Iterator[None]:
        """Switch the calling thread into ROLE's namespace for the block."""
        with enter_netns(self.netns(role)):
            yield

    def popen(
        self,
        role: Role,
        argv: Sequence[str],
        *,
        new_session: bool = False,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ARGV in ROLE's namespace, passing KWARGS to subprocess.Popen."""
        command = netns_command(self.netns(role), argv, new_session=new_session)
        return subprocess.Popen(command, **kwargs)

    def run(
        self,
        role: Role,
        argv: Sequence[str],
        *,
        check: bool = True,
        capture: bool = True,
        timeout: float | None = _COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV in ROLE's namespace and wait, as run_in_netns does."""
        return run_in_netns(
            self.netns(role),
            argv,
            check=check,
            capture=capture,
            timeout=timeout,
            input=input,
        )


def _ip(argv: Sequence[str]) -> None:
    try:
        run_command(["ip", *argv], timeout=_COMMAND_TIMEOUT)
    except NetnsCommandError as exc:
        raise LabError(str(exc)) from None


def sysctl(ns: str, key: str, value: str | int) -> None:
    """Set sysctl KEY (dotted, e.g. ``net.ipv4.ip_forward``) in namespace NS.

    Writes ``/proc/sys/...`` from a thread inside NS, because the net.* sysctls
    belong to the network namespace of the task that opens the file. Dots in KEY
    all become slashes, so interface names with dots are not supported.

    Raises:
        LabError: the key does not exist or the write failed.
        NetnsError: NS does not exist.
    """
    path = Path("/proc/sys", *key.split("."))
    with enter_netns(ns):
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            raise LabError(
                f"setting sysctl {key}={value} in netns {ns!r} failed: {exc}"
            ) from None


def _new_lab_id() -> str:
    existing = _list_netns()
    for _ in range(16):
        lab_id = secrets.token_hex(3)
        prefix = f"{NETNS_PREFIX}{lab_id}-"
        if not (RECORD_DIR / f"{lab_id}.json").exists() and not any(
            name.startswith(prefix) for name in existing
        ):
            return lab_id
    raise LabError("no unused lab id found after 16 random tries")


def _make_lab(
    lab_id: str, extra_peer_addresses: int, attacker: bool, second_container: bool
) -> Lab:
    def ns(role: str) -> str:
        return f"{NETNS_PREFIX}{lab_id}-{role}"

    def link(kind: str, end: int) -> str:
        return f"{LINK_PREFIX}{lab_id}{kind}{end}"

    return Lab(
        lab_id=lab_id,
        peer_ns=ns("peer"),
        gw_ns=ns("gw"),
        ctr_ns=ns("ctr"),
        atk_ns=ns("atk") if attacker else None,
        peer_if=link("p", 0),
        gw_peer_if=link("p", 1),
        ctr_if=link("c", 0),
        gw_ctr_if=link("c", 1),
        atk_if=link("a", 0) if attacker else None,
        gw_atk_if=link("a", 1) if attacker else None,
        peer_v4="198.18.1.2",
        peer_v6="2001:2:0:1::2",
        gw_peer_v4="198.18.1.1",
        gw_peer_v6="2001:2:0:1::1",
        gw_ctr_v4="198.18.2.1",
        gw_ctr_v6="2001:2:0:2::1",
        ctr_v4="198.18.2.2",
        ctr_v6="2001:2:0:2::2",
        extra_peer_v4=tuple(f"198.18.1.{3 + i}" for i in range(extra_peer_addresses)),
        extra_peer_v6=tuple(
            f"2001:2:0:1::{3 + i:x}" for i in range(extra_peer_addresses)
        ),
        atk_v4="198.18.3.2" if attacker else None,
        atk_v6="2001:2:0:3::2" if attacker else None,
        gw_atk_v4="198.18.3.1" if attacker else None,
        gw_atk_v6="2001:2:0:3::1" if attacker else None,
        ctr2_ns=ns("ctr2") if second_container else None,
        ctr2_if=link("d", 0) if second_container else None,
        gw_ctr2_if=link("d", 1) if second_container else None,
        ctr2_v4="198.18.4.2" if second_container else None,
        ctr2_v6="2001:2:0:4::2" if second_container else None,
        gw_ctr2_v4="198.18.4.1" if second_container else None,
        gw_ctr2_v6="2001:2:0:4::1" if second_container else None,
    )


def _write_record(lab: Lab, lifetime: Lifetime) -> Path:
    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    path = RECORD_DIR / f"{lab.lab_id}.json"
    record = {
        "pid": os.getpid(),
        "created": time.time(),
        "owner": asdict(current_owner(lifetime)),
        "lab": asdict(lab),
    }
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)
    return path


def _add_address(ns: str, iface: str, address: str, prefix_len: int) -> None:
    if ":" in address:
        # nodad makes the address usable at once instead of after about 1 s of
        # duplicate address detection.
        _ip(
            ["-n", ns, "-6", "addr", "add", f"{address}/{prefix_len}"]
            + ["dev", iface, "nodad"]
        )
    else:
        _ip(["-n", ns, "addr", "add", f"{address}/{prefix_len}", "dev", iface])


def _connect(
    outer_ns: str,
    outer_if: str,
    outer_addresses: Sequence[str],
    gw_ns: str,
    gw_if: str,
    gw_addresses: Sequence[str],
) -> None:
    """Join OUTER_NS to the gateway with a veth and route the lab ranges via it."""
    _ip(
        ["-n", outer_ns, "link", "add", outer_if, "type", "veth"]
        + ["peer", "name", gw_if, "netns", gw_ns]
    )
    for address in outer_addresses:
        _add_address(outer_ns, outer_if, address, 64 if ":" in address else 24)
    for address in gw_addresses:
        _add_address(gw_ns, gw_if, address, 64 if ":" in address else 24)
    _ip(["-n", outer_ns, "link", "set", outer_if, "up"])
    _ip(["-n", gw_ns, "link", "set", gw_if, "up"])
    gw_v4, gw_v6 = gw_addresses
    _ip(["-n", outer_ns, "route", "add", LAB_NET_V4, "via", gw_v4])
    _ip(["-n", outer_ns, "-6", "route", "add", LAB_NET_V6, "via", gw_v6])


def _required(value: str | None) -> str:
    # The fields of an optional namespace are all set or all None, so None here
    # is a bug in _make_lab.
    if value is None:
        raise LabError("optional namespace is set but one of its fields is None")
    return value


def _build(lab: Lab) -> None:
    for name in lab.namespaces:
        _ip(["netns", "add", name])
        _ip(["-n", name, "link", "set", "lo", "up"])
        # Link-local addresses are still tentative for about 1 s of duplicate
        # address detection, and until then neighbor discovery through the
        # gateway loses the first IPv6 packets. Lab links have no duplicates.
        sysctl(name, "net.ipv6.conf.default.accept_dad", 0)
    sysctl(lab.gw_ns, "net.ipv4.ip_forward", 1)
    sysctl(lab.gw_ns, "net.ipv6.conf.all.forwarding", 1)
    _connect(
        lab.peer_ns,
        lab.peer_if,
        [lab.peer_v4, lab.peer_v6, *lab.extra_peer_v4, *lab.extra_peer_v6],
        lab.gw_ns,
        lab.gw_peer_if,
        [lab.gw_peer_v4, lab.gw_peer_v6],
    )
    _connect(
        lab.ctr_ns,
        lab.ctr_if,
        [lab.ctr_v4, lab.ctr_v6],
        lab.gw_ns,
        lab.gw_ctr_if,
        [lab.gw_ctr_v4, lab.gw_ctr_v6],
    )
    if lab.atk_ns is not None:
        _connect(
            lab.atk_ns,
            _required(lab.atk_if),
            [_required(lab.atk_v4), _required(lab.atk_v6)],
            lab.gw_ns,
            _required(lab.gw_atk_if),
            [_required(lab.gw_atk_v4), _required(lab.gw_atk_v6)],
        )
    if lab.ctr2_ns is not None:
        _connect(
            lab.ctr2_ns,
            _required(lab.ctr2_if),
            [_required(lab.ctr2_v4), _required(lab.ctr2_v6)],
            lab.gw_ns,
            _required(lab.gw_ctr2_if),
            [_required(lab.gw_ctr2_v4), _required(lab.gw_ctr2_v6)],
        )


def _lab_links(lab: Lab) -> list[tuple[str, str]]:
    pairs = [
        (lab.peer_ns, lab.peer_if),
        (lab.gw_ns, lab.gw_peer_if),
        (lab.ctr_ns, lab.ctr_if),
        (lab.gw_ns, lab.gw_ctr_if),
    ]
    if lab.atk_ns is not None and lab.atk_if and lab.gw_atk_if:
        pairs += [(lab.atk_ns, lab.atk_if), (lab.gw_ns, lab.gw_atk_if)]
    if lab.ctr2_ns is not None and lab.ctr2_if and lab.gw_ctr2_if:
        pairs += [(lab.ctr2_ns, lab.ctr2_if), (lab.gw_ns, lab.gw_ctr2_if)]
    return pairs


def _link_ready(ns: str, iface: str) -> bool:
    link = run_in_netns(ns, ["ip", "-o", "link", "show", "dev", iface])
    if " state UP " not in link.stdout:
        return False
    tentative = run_in_netns(
        ns, ["ip", "-6", "-o", "addr", "show", "dev", iface, "tentative"]
    )
    return not tentative.stdout.strip()


def _wait_ready(lab: Lab, timeout: float) -> None:
    """Wait until every lab veth has carrier and no tentative IPv6 address.

    The kernel reports veth carrier asynchronously, up to about 1 s after
    ``link set up``, and IPv6 adds its connected routes only then, so packets sent
    before that are lost.
    """
    deadline = time.monotonic() + timeout
    pending = _lab_links(lab)
    while True:
        pending = [(ns, iface) for ns, iface in pending if not _link_ready(ns, iface)]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise LabError(
                f"lab {lab.lab_id}: links {[i for _, i in pending]} not ready "
                f"(carrier up, IPv6 addresses usable) after {timeout:.0f} s"
            )
        time.sleep(0.02)


def _namespace_pids(name: str) -> list[int]:
    """Return the pids of the processes in network namespace NAME."""
    try:
        result = subprocess.run(
            ["ip", "netns", "pids", name],
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"command ['ip', 'netns', 'pids', {name!r}] timed out") from None
    if result.returncode != 0:
        raise LabError(
            f"command ['ip', 'netns', 'pids', {name!r}] exited {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _kill_namespace_processes(lab_id: str) -> list[str]:
    """SIGKILL every process in the namespaces of lab LAB_ID and wait for them.

    A process left in a deleted namespace keeps that namespace and its veths
    alive, so a stale lab is only gone once they have exited.

    Returns:
        The killed processes as ``"killed pid 123 (tcpdump)"``.
    """
    prefix = f"{NETNS_PREFIX}{lab_id}-"
    names = [name for name in _list_netns() if name.startswith(prefix)]
    killed: list[str] = []
    own = os.getpid()
    for name in names:
        for pid in _namespace_pids(name):
            if pid == own:
                continue
            description = f"killed pid {pid} ({_process_name(pid)})"
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(description)
    deadline = time.monotonic() + KILL_WAIT_TIMEOUT
    pending = names if killed else []
    while pending:
        pending = [name for name in pending if _namespace_pids(name)]
        if not pending:
            break
        if time.monotonic() >= deadline:
            log.warning(
                "lab %s: processes still in %s %.0f s after SIGKILL",
                lab_id,
                pending,
                KILL_WAIT_TIMEOUT,
            )
            break
        time.sleep(0.02)
    return killed


@contextmanager
def _reap_lock(timeout: float) -> Iterator[bool]:
    """Hold an exclusive lock on RECORD_DIR for the block, or yield False on timeout.

    Two processes that removed the same stale lab at once would each find the
    other's half-deleted namespaces, and one of them would fail.
    """
    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(RECORD_DIR / ".reap.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        # closing the descriptor releases the lock
        os.close(fd)


def reap_stale_labs() -> dict[str, list[str]]:
    """Remove every lab that belongs to a process that has exited.

    Kills the processes still running in the lab's namespaces, then removes the
    lab as lab_down does, and logs one WARNING per lab with what was removed.
    Labs without an owner in their record (written by older code), persistent
    labs and labs whose owner is alive are left alone, as stale_reason decides.
    A lab whose removal fails is logged and left for the next call.

    Returns:
        By lab id, the killed processes and removed items.
    """
    reaped: dict[str, list[str]] = {}
    if not RECORD_DIR.is_dir():
        return reaped
    with _reap_lock(REAP_LOCK_TIMEOUT) as locked:
        if not locked:
            log.warning(
                "skipped removing stale labs: another process held %s for %.0f s",
                RECORD_DIR / ".reap.lock",
                REAP_LOCK_TIMEOUT,
            )
            return reaped
        pid_namespace = own_pid_namespace()
        for path in sorted(RECORD_DIR.glob("*.json")):
            lab_id = path.stem
            if not _ID_RE.fullmatch(lab_id):
                continue
            record = read_lab_record(path)
            if record is None:
                continue
            try:
                reason = stale_reason(
                    owner_from_record(record),
                    process_of=read_process,
                    pid_namespace=pid_namespace,
                )
            except (OSError, ValueError) as exc:
                log.warning(
                    "reading the owner process of lab %s failed, so the lab is "
                    "kept: %s",
                    lab_id,
                    exc,
                )
                continue
            if reason is None:
                continue
            try:
                killed = _kill_namespace_processes(lab_id)
                removed = killed + lab_down(lab_id)
            except (LabError, OSError, subprocess.SubprocessError) as exc:
                log.error("removing stale lab %s failed (%s): %s", lab_id, reason, exc)
                continue
            reaped[lab_id] = removed
            log.warning(
                "removed stale lab %s because %s: %s",
                lab_id,
                reason,
                ", ".join(removed) or "nothing was left",
            )
    return reaped


def lab_up(
    *,
    extra_peer_addresses: int = 0,
    attacker: bool = False,
    second_container: bool = False,
    lab_id: str | None = None,
    persistent: bool = False,
) -> Lab:
    """Create a lab and return its description.

    First removes the labs of processes that have exited, as reap_stale_labs
    does. The record in RECORD_DIR is written before anything else of the new
    lab, and on any failure, KeyboardInterrupt included, everything created so
    far is removed before the exception propagates.

    Args:
        extra_peer_addresses: additional peer addresses 198.18.1.3, .4, ... and
            2001:2:0:1::3, ::4, ...; at most 250.
        attacker: also create the attacker namespace on 198.18.3.0/24.
        second_container: also create a second container namespace (ctr2) on
            198.18.4.0/24, behind the same gateway.
        lab_id: 6 lowercase hex digits; random and unused when None.
        persistent: keep the lab after the calling process exits, until
            lab_down. Otherwise the lab belongs to the calling process, and once
            that process has exited, the next lab_up of any process removes it.

    Raises:
        LabError: a command failed or LAB_ID is already in use.
    """
    if not 0 <= extra_peer_addresses <= MAX_EXTRA_PEER_ADDRESSES:
        raise ValueError(
            f"invalid extra_peer_addresses {extra_peer_addresses}: "
            f"use 0-{MAX_EXTRA_PEER_ADDRESSES}"
        )
    reap_stale_labs()
    if lab_id is None:
        lab_id = _new_lab_id()
    else:
        _check_id(lab_id)
        prefix = f"{NETNS_PREFIX}{lab_id}-"
        in_use = [name for name in _list_netns() if name.startswith(prefix)]
        if in_use:
            raise LabError(
                f"lab id {lab_id} is in use by {in_use}: pick another id or run "
                f"lab_down({lab_id!r})"
            )
    lab = _make_lab(lab_id, extra_peer_addresses, attacker, second_container)
    try:
        _write_record(lab, "persistent" if persistent else "process")
        _build(lab)
        _wait_ready(lab, READY_TIMEOUT)
        log.info("lab %s up: namespaces %s", lab_id, ", ".join(lab.namespaces))
    except BaseException:
        log.warning("lab %s setup failed, removing what was created", lab_id)
        try:
            lab_down(lab_id)
        except Exception:
            # Keep the setup error as the one that propagates.
            log.exception("cleanup of failed lab %s failed", lab_id)
        raise
    return lab


def _check_id(lab_id: str) -> None:
    if not _ID_RE.fullmatch(lab_id):
        raise ValueError(f"invalid lab id {lab_id!r}: use 6 lowercase hex digits")


def _list_netns() -> list[str]:
    try:
        result = subprocess.run(
            ["ip", "netns", "list"],
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LabError("command ['ip', 'netns', 'list'] timed out") from None
    if result.returncode != 0:
        raise LabError(
            f"command ['ip', 'netns', 'list'] exited {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    # Lines look like "NAME" or "NAME (id: 3)".
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _root_links(prefix: str) -> list[str]:
    result = subprocess.run(
        ["ip", "-o", "link", "show"],
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
        check=True,
    )
    names: list[str] = []
    for line in result.stdout.splitlines():
        # "12: NAME@PEER: <FLAGS> ..." with "@PEER" only for some link types.
        fields = line.split(":", 2)
        if len(fields) < 3:
            continue
        name = fields[1].strip().split("@", 1)[0]
        if name.startswith(prefix):
            names.append(name)
    return names


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT during the block, and deliver it once the block is done.

    Only the main thread can change signal handlers, so in other threads, and
    when the SIGINT handler was not installed from Python, the block runs
    without this protection.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def lab_down(lab_id: str) -> list[str]:
    """Remove every namespace ``sp-<lab_id>-*``, stray root links and the record.

    Works from ``ip netns list``, not from the record, so it also cleans up after a
    crash in the middle of lab_up. A SIGINT (Ctrl-C) that arrives meanwhile in
    the main thread takes effect once the lab is removed, so it cannot leave
    half a lab behind.

    Returns:
        The removed namespace names, root-namespace link names and record path.

    Raises:
        LabError: something of the lab is still present after removal.
    """
    _check_id(lab_id)
    with _sigint_deferred():
        return _remove_lab(lab_id)


def _remove_lab(lab_id: str) -> list[str]:
    removed: list[str] = []
    prefix = f"{NETNS_PREFIX}{lab_id}-"
    for name in _list_netns():
        if name.startswith(prefix):
            _ip(["netns", "delete", name])
            removed.append(name)
    # The veths are created inside the lab namespaces and die with them. A link
    # with the lab's prefix in the root namespace means that setup went wrong.
    link_prefix = f"{LINK_PREFIX}{lab_id}"
    for name in _root_links(link_prefix):
        _ip(["link", "delete", name])
        removed.append(name)
    record = RECORD_DIR / f"{lab_id}.json"
    for path in (record, record.with_suffix(".tmp")):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(str(path))
    leftover = [name for name in _list_netns() if name.startswith(prefix)]
    leftover += _root_links(link_prefix)
    if leftover:
        raise LabError(f"lab {lab_id} still has {leftover} after removal")
    if removed:
        log.info("lab %s down: removed %s", lab_id, ", ".join(removed))
    return removed


def lab_down_all() -> list[str]:
    """Remove every recorded lab and every ``sp-<id>-<role>`` namespace.

    This also removes labs that other processes are still using.

    Returns:
        Everything removed, as lab_down reports it.
    """
    ids: set[str] = set()
    if RECORD_DIR.is_dir():
        for path in RECORD_DIR.iterdir():
            if path.suffix in (".json", ".tmp") and _ID_RE.fullmatch(path.stem):
                ids.add(path.stem)
    for name in _list_netns():
        match = _LAB_NETNS_RE.fullmatch(name)
        if match is not None:
            ids.add(match.group(1))
    removed: list[str] = []
    for lab_id in sorted(ids):
        removed.extend(lab_down(lab_id))
    return removed


@contextmanager
def lab(
    *,
    extra_peer_addresses: int = 0,
    attacker: bool = False,
    second_container: bool = False,
    lab_id: str | None = None,
) -> Iterator[Lab]:
    """Create a lab for the block and remove it afterwards, also on exceptions."""
    created = lab_up(
        extra_peer_addresses=extra_peer_addresses,
        attacker=attacker,
        second_container=second_container,
        lab_id=lab_id,
    )
    try:
        yield created
    finally:
        lab_down(created.lab_id)
