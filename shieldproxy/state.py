"""Frozen flows saved across a daemon restart.

With ``durability: memory``, on SIGTERM during a freeze the daemon acknowledges
what it holds, then writes each flow of a frozen scope into
``STATE_DIR/<scope>/``: a hand-over file pair (the bytes absorbed so far) and
the flow's original snapshot. The next start reads them back and answers again
from where the first process stopped. With ``durability: journal`` the
scope's journal (:mod:`shieldproxy.journal`) holds the same, all the time.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .handover import HandoverFileError, load_handover, save_handover
from .tcp.flow import FlowHandover
from .tcp.seq import seq_diff
from .tcp.snapshot import FlowKey, FlowSnapshot

SCOPE_FILE = "scope.json"
SNAPSHOT_SUFFIX = ".snapshot.json"


class StateFileError(ValueError):
    """A saved frozen scope cannot be read back."""


def scope_folder(state_dir: Path, scope: str) -> Path:
    return state_dir / scope


def snapshot_document(snapshot: FlowSnapshot) -> dict[str, Any]:
    """Return SNAPSHOT as a JSON-ready dict, the key as a nested dict."""
    document = asdict(snapshot)
    document["key"] = asdict(snapshot.key)
    return document


def snapshot_from_document(document: Any) -> FlowSnapshot:
    """Build a snapshot from the dict snapshot_document returns.

    Raises:
        StateFileError: a field is missing, unknown or of the wrong type.
    """
    if not isinstance(document, dict):
        raise StateFileError(f"invalid snapshot {document!r}: expected an object")
    fields = dict(document)
    try:
        key_fields = fields.pop("key")
        if not isinstance(key_fields, dict):
            raise TypeError("'key' must be an object")
        key = FlowKey.create(
            str(key_fields["container_addr"]),
            _integer(key_fields, "container_port"),
            str(key_fields["peer_addr"]),
            _integer(key_fields, "peer_port"),
        )
        snapshot = FlowSnapshot(key=key, **fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"invalid snapshot: {exc}") from None
    for name in ("rcv_nxt", "rcv_wup", "snd_una", "snd_nxt", "tsval"):
        value = getattr(snapshot, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise StateFileError(f"invalid snapshot: {name} {value!r} is not an int")
        if not 0 <= value < 2**32:
            raise StateFileError(f"invalid snapshot: {name} {value} is not 32-bit")
    if not isinstance(snapshot.peer_fin, bool):
        raise StateFileError(
            f"invalid snapshot: peer_fin {snapshot.peer_fin!r} is not true or false"
        )
    if isinstance(snapshot.rcv_wnd, bool) or not isinstance(snapshot.rcv_wnd, int):
        raise StateFileError(f"invalid snapshot: rcv_wnd {snapshot.rcv_wnd!r}")
    if not 0 <= snapshot.rcv_wnd < 2**31:
        raise StateFileError(
            f"invalid snapshot: rcv_wnd {snapshot.rcv_wnd} out of range"
        )
    return snapshot


def _integer(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} {value!r} is not an int")
    return value


def save_flow(
    folder: Path, snapshot: FlowSnapshot, handover: FlowHandover, taken_at: float
) -> None:
    """Write one flow: its original snapshot and everything acknowledged so far."""
    handover_path = save_handover(handover, folder, taken_at)
    document = snapshot_document(snapshot)
    document["handover"] = handover_path.name
    path = handover_path.with_name(handover_path.stem + SNAPSHOT_SUFFIX)
    _write(path, json.dumps(document, indent=2) + "\n")


def save_scope(folder: Path, frozen_for_s: float) -> None:
    """Mark FOLDER as a frozen scope; written last, so it means "complete"."""
    _write(folder / SCOPE_FILE, json.dumps({"frozen_for_s": frozen_for_s}) + "\n")


def load_scope(
    folder: Path,
) -> tuple[float, list[tuple[FlowSnapshot, FlowHandover, float]]] | None:
    """Read a saved frozen scope, or return None when FOLDER holds none.

    Each flow comes back as (original snapshot, hand-over so far, the monotonic
    time of the hand-over's tsval).
    """
    marker = folder / SCOPE_FILE
    if not marker.exists():
        return None
    try:
        frozen_for_s = float(json.loads(marker.read_text())["frozen_for_s"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateFileError(f"cannot read {marker}: {exc}") from None
    flows = []
    for path in sorted(folder.glob("*" + SNAPSHOT_SUFFIX)):
        try:
            document: dict[str, Any] = json.loads(path.read_text())
            key = FlowKey(**document.pop("key"))
            handover_name = document.pop("handover")
            snapshot = FlowSnapshot(key=key, **document)
            handover, taken_at = load_handover(folder / handover_name)
        except (OSError, ValueError, KeyError, TypeError, HandoverFileError) as exc:
            raise StateFileError(f"cannot read saved flow {path}: {exc}") from None
        flows.append((snapshot, handover, taken_at))
    return frozen_for_s, flows


def continuation(
    snapshot: FlowSnapshot, handover: FlowHandover, taken_at: float
) -> FlowSnapshot:
    """Return the snapshot a new shield flow starts from to go on after HANDOVER.

    The earlier process acknowledged every byte up to ``handover.rcv_nxt`` and
    showed ``handover.right_edge``, so the new flow starts there.
    """
    return FlowSnapshot(
        key=snapshot.key,
        rcv_nxt=handover.rcv_nxt,
        rcv_wup=handover.rcv_nxt,
        rcv_wnd=max(0, seq_diff(handover.right_edge, handover.rcv_nxt)),
        snd_una=snapshot.snd_una,
        snd_nxt=snapshot.snd_nxt,
        rcv_wscale=snapshot.rcv_wscale,
        snd_wscale=snapshot.snd_wscale,
        mss=snapshot.mss,
        sack_ok=snapshot.sack_ok,
        timestamps_ok=snapshot.timestamps_ok,
        tsval=handover.tsval,
        taken_at=taken_at,
        ts_recent=handover.ts_recent,
    )


def remove_scope(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def remove_saved_flows(folder: Path, keep_prefix: str) -> None:
    """Delete the files save_flow and save_scope wrote into FOLDER.

    Files whose name starts with KEEP_PREFIX stay. The scope marker goes
    first, so an interrupted removal leaves no scope that load_scope would
    read as complete.
    """
    (folder / SCOPE_FILE).unlink(missing_ok=True)
    for path in folder.iterdir():
        if not path.name.startswith(keep_prefix) and path.is_file():
            path.unlink(missing_ok=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
