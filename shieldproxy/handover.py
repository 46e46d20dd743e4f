"""Hand-over files: what a restore needs from the shield, one pair per flow.

``<name>.json`` holds the flow's receive state and ``<name>.bin`` the bytes the
shield acknowledged, to be appended to the restored socket's receive queue.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .tcp.flow import FlowHandover
from .tcp.segment import ACK, FIN, RST, Segment, TcpOptions
from .tcp.seq import seq_add, seq_lt
from .tcp.snapshot import FlowKey, FlowSnapshot

FORMAT = "shieldproxy-handover"
VERSION = 1


class HandoverFileError(ValueError):
    """A hand-over file is missing, unreadable or has an invalid field."""


def file_stem(key: FlowKey) -> str:
    """Return a file-name-safe name for a flow: container end, then peer end."""
    text = f"{key.container_addr}_{key.container_port}-{key.peer_addr}_{key.peer_port}"
    return text.replace(":", ".")


def save_handover(handover: FlowHandover, folder: Path, taken_at: float) -> Path:
    """Write the flow's hand-over into FOLDER and return the JSON file's path.

    ``taken_at`` is the CLOCK_MONOTONIC time at which ``handover.tsval`` was
    the shield's clock; a restore on this host adds the time since then.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem = file_stem(handover.key)
    data_path = folder / f"{stem}.bin"
    _write_atomic(data_path, handover.data)
    key = handover.key
    document = {
        "format": FORMAT,
        "version": VERSION,
        "container_addr": key.container_addr,
        "container_port": key.container_port,
        "peer_addr": key.peer_addr,
        "peer_port": key.peer_port,
        "start_seq": handover.start_seq,
        "rcv_nxt": handover.rcv_nxt,
        "fin": handover.fin,
        "reset": handover.reset,
        "right_edge": handover.right_edge,
        "tsval": handover.tsval,
        "tsval_at": taken_at,
        "ts_recent": handover.ts_recent,
        "discarded_bytes": handover.discarded_bytes,
        "data_file": data_path.name,
        "data_bytes": len(handover.data),
    }
    path = folder / f"{stem}.json"
    _write_atomic(path, (json.dumps(document, indent=2) + "\n").encode())
    return path


def load_handover(path: Path) -> tuple[FlowHandover, float]:
    """Read a hand-over file; return it and the monotonic time of its tsval."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HandoverFileError(f"cannot read hand-over file {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise HandoverFileError(f"{path} is not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise HandoverFileError(
            f"{path} has version {document.get('version')!r}, expected {VERSION}"
        )
    data_path = path.parent / _field(document, path, "data_file", str)
    try:
        data = data_path.read_bytes()
    except OSError as exc:
        raise HandoverFileError(
            f"cannot read the data file {data_path} of {path}: {exc.strerror}"
        ) from None
    if len(data) != _field(document, path, "data_bytes", int):
        raise HandoverFileError(
            f"{data_path} has {len(data)} bytes, {path} says "
            f"{document['data_bytes']}: the hand-over is incomplete"
        )
    key = FlowKey.create(
        _field(document, path, "container_addr", str),
        _field(document, path, "container_port", int),
        _field(document, path, "peer_addr", str),
        _field(document, path, "peer_port", int),
    )
    ts_recent = document.get("ts_recent")
    handover = FlowHandover(
        key=key,
        start_seq=_field(document, path, "start_seq", int),
        data=data,
        rcv_nxt=_field(document, path, "rcv_nxt", int),
        fin=_field(document, path, "fin", bool),
        reset=_field(document, path, "reset", bool),
        right_edge=_field(document, path, "right_edge", int),
        tsval=_field(document, path, "tsval", int),
        ts_recent=ts_recent if isinstance(ts_recent, int) else None,
        discarded_bytes=_field(document, path, "discarded_bytes", int),
    )
    return handover, float(_field(document, path, "tsval_at", (int, float)))


def restored_right_edge(
    handover: FlowHandover,
    *,
    window_bytes: int,
    rcvbuf_bytes: int,
    queued_bytes: int,
    scale_unit: int = 1,
) -> int:
    """Return the right edge to give a restored socket so the peer sends at once.

    The window past the handed-over bytes is the container's window at the
    dump, but no more than half the receive buffer left after the queued
    bytes. Linux advertises a zero window when its receive buffer is full, even
    if that moves the edge left, so a larger window would only be retracted.
    The edge lies at least one SCALE_UNIT (1 << the socket's receive window
    scale) past the one the shield showed. The restored kernel rounds its
    window to that unit from its own ACK numbers, so the edges it advertises
    may fall short of this one by less than a unit. They never fall short of
    the shield's.
    """
    free_bytes = max(0, rcvbuf_bytes - queued_bytes) // 2
    edge = seq_add(handover.rcv_nxt, min(window_bytes, free_bytes))
    floor = seq_add(handover.right_edge, scale_unit)
    if seq_lt(edge, floor):
        return floor
    return edge


def peer_close_segment(
    handover: FlowHandover, snapshot: FlowSnapshot, *, tsecr: int
) -> Segment | None:
    """Build the peer's FIN or RST for a restored socket, or None if it had none.

    The shield acknowledged the peer's FIN (or took its RST) in the container's
    name, so the peer will not send it again, and the restored socket must get
    it to reach EOF or a reset. It goes in after the release, at the end of the
    handed-over bytes. The ACK is the container's snd_una at the dump, which
    the restored socket also starts from, and the TSval is the peer's last.
    """
    if not (handover.fin or handover.reset):
        return None
    key = handover.key
    timestamp = None
    if snapshot.timestamps_ok and handover.ts_recent is not None:
        timestamp = (handover.ts_recent, tsecr & 0xFFFFFFFF)
    return Segment(
        version=key.family,
        src=key.peer_addr,
        dst=key.container_addr,
        sport=key.peer_port,
        dport=key.container_port,
        seq=handover.rcv_nxt,
        ack=snapshot.snd_una,
        flags=ACK | (RST if handover.reset else FIN),
        # The peer's own window is not known here. About 64 KiB lets the
        # container send its reply without a zero-window stall.
        window=max(1, 0xFFFF >> snapshot.snd_wscale),
        options=TcpOptions(timestamp=timestamp),
    )


def _field(document: dict[str, Any], path: Path, name: str, kind: Any) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HandoverFileError(
            f"{path}: field {name!r} is missing or not of type {kind}"
        )
    return value


def _write_atomic(path: Path, content: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
