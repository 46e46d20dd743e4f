"""``shieldproxy criu-hook``: CRIU's action script, driving a running shield.

CRIU runs its action script at each stage of a dump or restore, with the stage
in ``CRTOOLS_SCRIPT_ACTION`` and the image folder in ``CRTOOLS_IMAGE_DIR``.
CRIU 4.2 executes the script's path as it is, without arguments, so the hook
takes its settings from the environment (``SHIELDPROXY_SOCKET``,
``SHIELDPROXY_SCOPE``) and finds the scopes itself. The stages become control
requests to the shield daemon (gateway or sidecar):

- ``pre-dump`` and ``network-lock``: freeze every scope that covers a TCP
  socket of the dumped tree's network namespace. From here the daemon keeps
  the peers' packets in the queue, so none is lost to CRIU's own lock. It
  watches the image folder for each socket's tcp-stream image, which CRIU
  writes as soon as it has stopped the socket, and acknowledges the peer from
  then on: 0.15 s after this stage for socat and 0.33 s for redis-server in
  the lab tests. The scope names go into a
  folder beside the images, so the restore stages find them, also on another
  host.
- ``post-dump``: read every TCP flow from the complete images and hand the
  snapshots to the daemon, which adds those the watch missed.
- ``pre-restore``: thaw the scopes into the folder beside the images, then
  rewrite each flow's ``tcp-stream`` image so the restored socket already
  holds the absorbed bytes, a window whose right edge is at or past the one the
  shield showed, and a timestamp clock at or past the shield's. Each image is
  copied to a backup folder before its first change, and every rewrite starts
  from that copy, so a second restore attempt writes the same images.
- ``post-restore``: announce the restored windows. The sockets are still in
  repair mode, so the held packets stay held. After the thaw at
  ``pre-restore`` the shield went on acknowledging while CRIU restored. The
  daemon now stops and appends what it acknowledged since to the restored
  sockets through TCP_REPAIR, when they are in its PID namespace.
- ``pre-resume``: release. CRIU 4.2 has switched repair mode off by then and
  resumes the tasks right after. ``network-unlock`` releases nothing, because
  CRIU runs it before it switches repair off, and Linux 6.18 did not
  acknowledge data that reached a socket in repair mode until the peer
  retransmitted it. ``post-resume`` releases only if ``pre-resume`` did not:
  the image folder is closed by then, so ``post-restore`` leaves its path in
  a file named after the restored tree's PID.

A failure at a dump stage releases the scopes, because CRIU then resumes the
container with its live sockets. A failure at a restore stage keeps the
shield's state, the hand-over files and the original images, so the restore
can be tried again. If the operator releases the scopes in between, the next
restore uses the hand-over files of the failed attempt and announces nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..control import ControlError, DaemonNotRunning, call
from ..handover import HandoverFileError, load_handover, restored_right_edge
from ..state import snapshot_document
from ..tcp.flow import FlowHandover, restore_tsval
from ..tcp.seq import seq_add, seq_diff
from .images import ImageError

if TYPE_CHECKING:
    from .images import ImageFlow

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/shieldproxy/control.sock")
PENDING_DIR = Path("/run/shieldproxy/criu-hook")
"""Files ``<init pid>.json`` naming the image folder of a restore not yet released."""
SHIELD_FOLDER = "shieldproxy"
"""Folder in the image folder with the hook's files: scopes, hand-overs, backups."""
SCOPES_FILE = "scopes.json"
BACKUP_FOLDER = "backup"
RESTORED_FILE = "restored.json"
"""Each flow's receive window as written into the images."""
COMPLETE_FILE = "complete.json"
"""Marker in a scope's hand-over folder, written once its files are all there."""

RESTORE_TSVAL_MARGIN_MS = 2000
"""Milliseconds added to a restored socket's timestamp clock.

CRIU sets the clock some time after ``pre-restore``, and the shield's clock
runs on meanwhile. A clock ahead by this much is harmless: a peer's PAWS check
only rejects TSvals that move backwards, and the peer measures its RTT from
its own echoed TSvals.
"""

DUMP_STAGES = ("pre-dump", "network-lock", "post-dump")

# /proc/net/tcp states (the kernel's numbers in hex) of the sockets the hook
# looks at: the connected states CRIU dumps with --tcp-established, and LISTEN.
_CONNECTED = {"01", "04", "05", "08", "09", "0B"}
_TCP_STATES = _CONNECTED | {"0A"}


class HookError(RuntimeError):
    """A stage of the hook failed. The message names the stage and the cause."""


@dataclass(frozen=True)
class HookContext:
    """Inputs of one hook run: CRIU's stage and variables, the hook's options."""

    stage: str
    socket_path: Path
    image_dir: Path | None
    init_pid: int | None
    scope: str | None
    """Scope named by the operator; None means every scope that matches."""

    @property
    def shield_dir(self) -> Path:
        if self.image_dir is None:
            raise HookError(
                f"stage {self.stage}: CRTOOLS_IMAGE_DIR is not set; CRIU sets it "
                "for every stage"
            )
        return self.image_dir / SHIELD_FOLDER


def context_from_environment(
    environ: Mapping[str, str], scope: str | None, socket_path: Path | None
) -> HookContext:
    """Build the context from CRIU's variables, the hook's options and defaults."""
    stage = environ.get("CRTOOLS_SCRIPT_ACTION")
    if not stage:
        raise HookError(
            "CRTOOLS_SCRIPT_ACTION is not set: run the hook as CRIU's "
            "--action-script, not by hand"
        )
    if socket_path is None:
        socket_path = Path(environ.get("SHIELDPROXY_SOCKET") or DEFAULT_SOCKET)
    image_text = environ.get("CRTOOLS_IMAGE_DIR")
    # CRIU passes /proc/<pid>/fd/<n>. The daemon is another process and may
    # run in another mount namespace, so it gets the folder's real path.
    image_dir = Path(os.path.realpath(image_text)) if image_text else None
    pid_text = environ.get("CRTOOLS_INIT_PID", "")
    init_pid = int(pid_text) if pid_text.isdigit() else None
    return HookContext(
        stage=stage,
        socket_path=socket_path,
        image_dir=image_dir,
        init_pid=init_pid,
        scope=scope or environ.get("SHIELDPROXY_SCOPE") or None,
    )


def run_stage(context: HookContext) -> str:
    """Do the stage's work and return a one-line summary for CRIU's log.

    Raises:
        HookError: the stage failed; after a dump stage the scopes are released.
    """
    handlers: dict[str, Callable[[HookContext], str]] = {
        "pre-dump": _engage,
        "network-lock": _engage,
        "post-dump": _post_dump,
        "pre-restore": _pre_restore,
        "post-restore": _post_restore,
        "pre-resume": _release,
        "post-resume": _release_pending,
    }
    handler = handlers.get(context.stage)
    if handler is None:
        return "nothing to do at this stage"
    try:
        return handler(context)
    except DaemonNotRunning as exc:
        raise HookError(
            f"stage {context.stage}: {exc}; start the shield with "
            "`shieldproxy run --config FILE`, or set SHIELDPROXY_SOCKET to its "
            "control socket"
        ) from None
    except (
        ControlError,
        ImageError,
        HandoverFileError,
        HookError,
        OSError,
        ValueError,
    ) as exc:
        message = f"stage {context.stage} failed: {exc}"
        if context.stage in DUMP_STAGES:
            released = _release_after_failed_dump(context)
            message += f"; released scopes {released}, so the container runs on"
        else:
            message += (
                "; the shield keeps the flows, and the images and hand-over "
                "files are intact, so the restore can be tried again"
            )
        raise HookError(message) from None


# dump stages


def _engage(context: HookContext) -> str:
    status = call(context.socket_path, {"command": "status"})
    scopes: dict[str, Any] = status["scopes"]
    if context.scope is not None:
        if context.scope not in scopes:
            raise HookError(
                f"scope {context.scope!r} not found; the shield has "
                f"{', '.join(sorted(scopes)) or 'no scopes'}"
            )
        names = [context.scope]
    if context.scope is not None and context.init_pid is None:
        sockets = []  # no tree to look at: freeze without a watch
    else:
        sockets = _namespace_sockets(context.init_pid)
    if context.scope is None:
        endpoints = {(entry.local_addr, entry.local_port) for entry in sockets}
        names = _covering_scopes(scopes, endpoints)
    _write_json(context.shield_dir / SCOPES_FILE, {"scopes": names})
    if not names:
        return "no scope of the shield covers a TCP socket of this tree"
    for name in names:
        request: dict[str, Any] = {"command": "freeze", "scope": name}
        connected = {
            str(entry.inode): entry.key_document()
            for entry in sockets
            if entry.state in _CONNECTED
        }
        if context.image_dir is not None and connected:
            request["watch"] = {
                "image_dir": str(context.image_dir),
                "flows": connected,
            }
        call(context.socket_path, request)
    return f"froze scopes {', '.join(names)}"


@dataclass(frozen=True)
class _ProcSocket:
    """One line of /proc/<pid>/net/tcp or tcp6."""

    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    state: str
    inode: int

    def key_document(self) -> dict[str, Any]:
        """Return the flow key and the TCP state, as the daemon's watch reads them."""
        # NOTE: the state is read before the freeze, so a FIN that arrives in
        # between leaves it one state behind the dump. The post-dump stage
        # reads the state from files.img, but the daemon keeps a flow it
        # already shields.
        return {
            "container_addr": self.local_addr,
            "container_port": self.local_port,
            "peer_addr": self.remote_addr,
            "peer_port": self.remote_port,
            "state": int(self.state, 16),
        }


def _namespace_sockets(pid: int | None) -> list[_ProcSocket]:
    """Return the connected and LISTEN TCP sockets of PID's network namespace."""
    if pid is None:
        raise HookError(
            "CRTOOLS_INIT_PID is not set, so the dumped tree is unknown: set "
            "SHIELDPROXY_SCOPE to the scope to freeze"
        )
    sockets = []
    for name, version in (("tcp", 4), ("tcp6", 6)):
        path = Path(f"/proc/{pid}/net/{name}")
        try:
            lines = path.read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] not in _TCP_STATES:
                continue
            local_hex, local_port = fields[1].split(":")
            remote_hex, remote_port = fields[2].split(":")
            sockets.append(
                _ProcSocket(
                    local_addr=_proc_address(local_hex, version),
                    local_port=int(local_port, 16),
                    remote_addr=_proc_address(remote_hex, version),
                    remote_port=int(remote_port, 16),
                    state=fields[3],
                    inode=int(fields[9]),
                )
            )
    return sockets


def _proc_address(text: str, version: int) -> str:
    # /proc/net/tcp prints each 32-bit word of the address in host byte order.
    raw = bytes.fromhex(text)
    packed = b""
    for start in range(0, len(raw), 4):
        word = int.from_bytes(raw[start : start + 4], "big")
        packed += word.to_bytes(4, sys.byteorder)
    if version == 4:
        return str(ipaddress.IPv4Address(packed))
    address = ipaddress.IPv6Address(packed)
    # An IPv6 socket talking IPv4 shows IPv4-mapped addresses, packets do not.
    return str(address.ipv4_mapped or address)


def _covering_scopes(
    scopes: dict[str, Any], endpoints: set[tuple[str, int]]
) -> list[str]:
    names = []
    for name, scope in sorted(scopes.items()):
        networks = [ipaddress.ip_network(text) for text in scope["addresses"]]
        ports = set(scope["ports"])
        for address, port in endpoints:
            ip = ipaddress.ip_address(address)
            if ip.is_unspecified or (ports and port not in ports):
                continue
            if any(ip in network for network in networks):
                names.append(name)
                break
    return names


def _engaged_scopes(context: HookContext) -> list[str]:
    if context.scope is not None:
        return [context.scope]
    path = context.shield_dir / SCOPES_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise HookError(f"{path} is not valid JSON: {exc}") from None
    names = document.get("scopes") if isinstance(document, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HookError(f"{path}: 'scopes' must be a list of scope names")
    return names


def _post_dump(context: HookContext) -> str:
    names = _engaged_scopes(context)
    if not names:
        return "no scope engaged"
    from .images import read_tcp_flows, to_snapshot

    assert context.image_dir is not None
    flows = read_tcp_flows(context.image_dir)
    now = time.monotonic()
    snapshots = [snapshot_document(to_snapshot(flow, taken_at=now)) for flow in flows]
    shielded = 0
    for name in names:
        reply = call(
            context.socket_path,
            {"command": "freeze", "scope": name, "snapshots": snapshots},
        )
        shielded += int(reply["flows"])
    return f"shielding {shielded} of the {len(flows)} TCP flows in the images"


def _release_after_failed_dump(context: HookContext) -> list[str]:
    try:
        names = _engaged_scopes(context)
    except HookError:
        names = []
    released = []
    for name in names:
        try:
            call(
                context.socket_path,
                {"command": "release", "scope": name, "force": True},
            )
        except ControlError as exc:
            log.error("releasing scope %s after the failure failed: %s", name, exc)
            continue
        released.append(name)
    return released


# restore stages


def _pre_restore(context: HookContext) -> str:
    names = _engaged_scopes(context)
    if not names:
        return "no scope engaged"
    from .images import restore_backup

    assert context.image_dir is not None
    handovers: list[tuple[FlowHandover, float]] = []
    for name in names:
        handovers += _thaw(context, name)
    backup_dir = context.shield_dir / BACKUP_FOLDER
    restore_backup(context.image_dir, backup_dir)
    try:
        restored = _rewrite_images(context.image_dir, backup_dir, handovers)
    except BaseException:
        restore_backup(context.image_dir, backup_dir)
        raise
    _write_json(context.shield_dir / RESTORED_FILE, restored)
    absorbed = sum(len(handover.data) for handover, _ in handovers)
    return (
        f"wrote {absorbed} absorbed bytes of {len(restored)} flows into the "
        f"images; the originals are in {backup_dir}"
    )


def _thaw(context: HookContext, name: str) -> list[tuple[FlowHandover, float]]:
    folder = context.shield_dir / f"handover-{name}"
    marker = folder / COMPLETE_FILE
    request: dict[str, Any] = {
        "command": "thaw",
        "scope": name,
        "out_dir": str(folder),
        # The shield goes on acknowledging while CRIU restores. At
        # post-restore it gives the restored sockets what came since, if it
        # can reach them.
        "keep_answering": True,
        "requester_pid": os.getpid(),
    }
    try:
        reply = call(context.socket_path, request)
    except DaemonNotRunning:
        raise
    except ControlError:
        if not marker.exists():
            raise
        # A second restore attempt after an earlier plain thaw.
        log.info("reusing the hand-over files in %s", folder)
    else:
        files = [Path(path).name for path in reply["handovers"]]
        _write_json(marker, {"handovers": files})
    try:
        files = json.loads(marker.read_text())["handovers"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HookError(f"{marker} is invalid: {exc}") from None
    return [load_handover(folder / file) for file in files]


def _rewrite_images(
    image_dir: Path,
    backup_dir: Path,
    handovers: list[tuple[FlowHandover, float]],
) -> dict[str, dict[str, int]]:
    from .images import read_tcp_flows, rewrite_tcp_flow

    by_key = {flow.key: flow for flow in read_tcp_flows(image_dir)}
    restored: dict[str, dict[str, int]] = {}
    now = time.monotonic()
    for handover, handover_at in handovers:
        flow = by_key.get(handover.key)
        if flow is None:
            raise HookError(
                f"the images in {image_dir} have no TCP flow {handover.key}, but "
                "the shield handed it over; restore the images this shield "
                "engaged for"
            )
        window = restored_window(flow, handover, handover_at, now)
        rewrite_tcp_flow(
            image_dir,
            flow.inode,
            extra_bytes=handover.data,
            rcv_wnd=window.rcv_wnd,
            rcv_wup=window.rcv_nxt,
            timestamp=window.timestamp,
            backup_dir=backup_dir,
        )
        restored[str(handover.key)] = {
            "rcv_nxt": window.rcv_nxt,
            "right_edge": window.right_edge,
        }
    return restored


@dataclass(frozen=True)
class RestoredWindow:
    """Receive state written into a flow's tcp-stream image."""

    rcv_nxt: int
    """After the absorbed bytes; also the new rcv_wup."""
    rcv_wnd: int
    right_edge: int
    timestamp: int | None
    """TCP_TIMESTAMP clock, None for a flow without timestamps."""


def restored_window(
    flow: ImageFlow, handover: FlowHandover, handover_at: float, now: float
) -> RestoredWindow:
    """Return the receive state to write into FLOW's image after HANDOVER."""
    if handover.start_seq != flow.inq_seq:
        raise HookError(
            f"flow {handover.key}: the hand-over starts at sequence number "
            f"{handover.start_seq} but the image's receive queue ends at "
            f"{flow.inq_seq}, so the images and the shield disagree"
        )
    rcv_nxt = seq_add(flow.inq_seq, len(handover.data))
    right_edge = restored_right_edge(
        handover,
        window_bytes=flow.rcv_wnd,
        rcvbuf_bytes=flow.rcvbuf,
        queued_bytes=flow.inq_len + len(handover.data),
        scale_unit=1 << flow.rcv_wscale,
    )
    timestamp = None
    if flow.timestamps_ok:
        # rewrite_tcp_flow keeps the dumped low bit, which Linux 6.7+ reads as
        # the microsecond-TSval flag.
        timestamp = seq_add(
            restore_tsval(handover.tsval, handover_at, now), RESTORE_TSVAL_MARGIN_MS
        )
    return RestoredWindow(
        rcv_nxt=rcv_nxt,
        rcv_wnd=seq_diff(right_edge, rcv_nxt),
        right_edge=right_edge,
        timestamp=timestamp,
    )


def _restored_windows(context: HookContext) -> dict[str, dict[str, int]]:
    path = context.shield_dir / RESTORED_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise HookError(
            f"{path} is missing: the pre-restore stage did not run or failed"
        ) from None
    except ValueError as exc:
        raise HookError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise HookError(f"{path} is not a JSON object")
    return document


def _post_restore(context: HookContext) -> str:
    names = _engaged_scopes(context)
    if not names:
        return "no scope engaged"
    restored = _restored_windows(context)
    announced = 0
    released = []
    for name in names:
        request: dict[str, Any] = {
            "command": "announce",
            "scope": name,
            "restored": restored,
        }
        if context.init_pid is not None:
            request["restored_pid"] = context.init_pid
        try:
            reply = call(context.socket_path, request)
        except DaemonNotRunning:
            raise
        except ControlError:
            if not _is_idle(context, name):
                raise
            # The operator released the scope after an earlier restore failed.
            # The daemon then has no rule and no queued packet for it, so the
            # restored sockets talk to the peers directly.
            released.append(name)
            continue
        announced += len(reply["announced"])
        restored.update(reply.get("windows", {}))
    # the release announces these windows too, after any top-up
    _write_json(context.shield_dir / RESTORED_FILE, restored)
    pending = _pending_file(context)
    if pending is not None:
        _write_json(pending, {"image_dir": str(context.image_dir)})
    summary = f"announced {announced} restored windows"
    if released:
        summary += (
            ". Scopes released before this restore, with nothing to announce: "
            + ", ".join(released)
        )
    return summary


def _is_idle(context: HookContext, name: str) -> bool:
    """Return True when the daemon reports scope NAME idle: released, no rules."""
    scopes = call(context.socket_path, {"command": "status"}).get("scopes", {})
    scope = scopes.get(name) if isinstance(scopes, dict) else None
    return isinstance(scope, dict) and scope.get("state") == "idle"


def _pending_file(context: HookContext) -> Path | None:
    if context.init_pid is None:
        return None
    return PENDING_DIR / f"{context.init_pid}.json"


def _release(context: HookContext) -> str:
    names = _engaged_scopes(context)
    if not names:
        return "no scope engaged"
    restored = _restored_windows(context)
    for name in names:
        call(
            context.socket_path,
            {"command": "release", "scope": name, "restored": restored},
        )
    pending = _pending_file(context)
    if pending is not None:
        pending.unlink(missing_ok=True)
    return f"released scopes {', '.join(names)}"


def _release_pending(context: HookContext) -> str:
    pending = _pending_file(context)
    if pending is None or not pending.exists():
        return "nothing left to release"
    try:
        image_dir = Path(json.loads(pending.read_text())["image_dir"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HookError(f"{pending} is invalid: {exc}") from None
    return _release(dataclasses.replace(context, image_dir=image_dir))


def _write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)


def hook_main(scope: str | None, socket_path: Path | None) -> int:
    """Run the stage CRIU names in the environment; return the exit status."""
    try:
        context = context_from_environment(os.environ, scope, socket_path)
        summary = run_stage(context)
    except HookError as exc:
        # CRIU copies the action script's stderr into its log.
        print(f"shieldproxy criu-hook: {exc}", file=sys.stderr)
        return 1
    print(f"shieldproxy criu-hook: {context.stage}: {summary}", file=sys.stderr)
    return 0


def main() -> int:
    """Run as ``shieldproxy-criu-hook``, the path CRIU's action-script names.

    It imports far less than the ``shieldproxy`` command, because CRIU waits
    for it at every stage while the peers wait for CRIU.
    """
    parser = argparse.ArgumentParser(
        prog="shieldproxy-criu-hook",
        description="CRIU action script that drives a running shieldproxy daemon.",
    )
    parser.add_argument(
        "--scope", help="scope to freeze (default SHIELDPROXY_SCOPE, or every match)"
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help=f"daemon control socket (default SHIELDPROXY_SOCKET, or {DEFAULT_SOCKET})",
    )
    args = parser.parse_args()
    return hook_main(args.scope, args.socket)
