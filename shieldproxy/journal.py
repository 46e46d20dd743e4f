"""Write-ahead journal of what the shield acknowledged, one file per frozen scope.

Once the shield acknowledges a byte, the peer discards it, so the shield has
the only copy. With ``durability: journal`` the daemon appends to
``STATE_DIR/<scope>/journal`` each flow's original snapshot, every payload that
brought new bytes, and after each batch of packets the acknowledgement number,
right edge and timestamp clock it is about to send. The file is flushed with
fdatasync before those ACKs leave (group commit), so an ACK is never sent for a
byte that a crash could lose.

A restarted daemon reads the journal back (:func:`read_journal`) and gets for
each flow the same hand-over a clean shutdown would have saved: the bytes up to
the last acknowledgement number journaled, the right edge and the TSval shown.

File format: the magic line, then records of ``<u32 body length><u8 type>``,
the body and a CRC-32 of type and body. A record cut short or with a bad CRC
ends the journal: it can only be the last write of a process that died, whose
ACKs were never sent.

``shieldproxy flows list|export`` and ``python -m shieldproxy.journal
list|export JOURNAL`` show a journal's flows and write a flow's acknowledged
bytes to a file, also while a daemon runs.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .state import StateFileError, snapshot_document, snapshot_from_document
from .tcp.flow import FlowHandover
from .tcp.reassembly import Reassembler
from .tcp.seq import seq_add, seq_diff
from .tcp.snapshot import FlowKey, FlowSnapshot

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal"
MAGIC = b"shieldproxy-journal 1\n"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

_HEADER = struct.Struct("<IB")
_CRC = struct.Struct("<I")
_FLOW_ID = struct.Struct("<I")
_DATA = struct.Struct("<II")
_ACKED = struct.Struct("<IIIIdBI")
_FIN_FLAG = 1
_TS_RECENT_FLAG = 2
# A record body above this is treated as damage, not as a record to allocate.
MAX_RECORD_BYTES = 64 * 1024 * 1024


class RecordType(enum.IntEnum):
    SCOPE = 1
    """JSON: scope name, CLOCK_MONOTONIC and wall time of the freeze, boot id."""
    FLOW = 2
    """Flow id, then the flow's original snapshot as JSON."""
    DATA = 3
    """Flow id, sequence number of the first byte, payload."""
    ACKED = 4
    """Flow id and the state the ACKs about to be sent show the peer."""
    THAWED = 5
    """The scope was handed over; the hand-over files hold the bytes now."""


class JournalError(ValueError):
    """A journal cannot be read back or written."""


@dataclass(frozen=True)
class AckedState:
    """State shown to the peer in a flow's ACKs, journaled before they are sent."""

    ack: int
    """Acknowledgement number, including the peer's FIN when ``fin`` is set."""
    right_edge: int
    """Largest ack + scaled window shown."""
    tsval: int
    """The shield's timestamp clock at ``tsval_at``, at or above every TSval sent."""
    tsval_at: float
    """CLOCK_MONOTONIC seconds at which ``tsval`` was read."""
    ts_recent: int | None
    fin: bool
    """The peer's FIN has arrived in order."""


@dataclass
class JournaledFlow:
    """One flow as a journal describes it: snapshot, bytes held, last ACK state."""

    snapshot: FlowSnapshot
    buffer: Reassembler = field(default_factory=Reassembler)
    acked: AckedState | None = None

    def add_data(self, seq: int, payload: bytes) -> None:
        offset = seq_diff(seq, self.snapshot.rcv_nxt)
        if offset < 0:
            # bytes before the snapshot are the container's already
            payload = payload[-offset:]
            offset = 0
        if payload:
            self.buffer.insert(offset, payload)

    @property
    def missing_bytes(self) -> int:
        """Acknowledged bytes the journal does not hold; nonzero is a bug."""
        if self.acked is None:
            return 0
        acked = seq_diff(self.acked.ack, self.snapshot.rcv_nxt)
        if self.acked.fin:
            acked -= 1
        return max(0, acked - self.buffer.contiguous_end)

    def handover(self) -> tuple[FlowHandover, float]:
        """Return the flow's hand-over and the monotonic time of its TSval.

        The data ends at the last acknowledgement number journaled. Journaled
        bytes past it were never acknowledged, so the peer still has them.
        """
        snapshot = self.snapshot
        base = snapshot.rcv_nxt
        acked = self.acked
        if acked is None:
            edge, tsval, tsval_at = snapshot.right_edge, snapshot.tsval, None
            ack_offset, fin, ts_recent = 0, False, snapshot.ts_recent
        else:
            edge, tsval, tsval_at = acked.right_edge, acked.tsval, acked.tsval_at
            ack_offset, fin = seq_diff(acked.ack, base), acked.fin
            ts_recent = acked.ts_recent
            if ts_recent is None:
                ts_recent = snapshot.ts_recent
        data_end = max(0, min(ack_offset, self.buffer.contiguous_end))
        data = self.buffer.prefix(data_end)
        handover = FlowHandover(
            key=snapshot.key,
            start_seq=base,
            data=data,
            rcv_nxt=seq_add(base, len(data)),
            fin=fin and ack_offset > data_end,
            reset=False,
            right_edge=edge,
            tsval=tsval,
            ts_recent=ts_recent,
            discarded_bytes=self.buffer.buffered_bytes - len(data),
        )
        return handover, snapshot.taken_at if tsval_at is None else tsval_at


@dataclass
class JournalContents:
    """Contents of a journal, as read back."""

    scope: str
    frozen_at: float
    """CLOCK_MONOTONIC seconds of the freeze, moved to this boot's clock."""
    thawed: bool
    flows: dict[int, JournaledFlow]
    valid_bytes: int
    """Length of the readable part; a torn tail starts here."""
    file_bytes: int

    def recovered(self) -> list[tuple[FlowSnapshot, FlowHandover, float]]:
        """Return (original snapshot, hand-over, TSval time) for every flow."""
        result = []
        for flow in self.flows.values():
            handover, tsval_at = flow.handover()
            result.append((flow.snapshot, handover, tsval_at))
        return result


def journal_path(folder: Path) -> Path:
    return folder / JOURNAL_FILE


def read_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


# writing


def encode_record(kind: RecordType, body: bytes) -> bytes:
    header = _HEADER.pack(len(body), kind)
    return header + body + _CRC.pack(zlib.crc32(body, zlib.crc32(header)))


def _scope_record(scope: str, frozen_at: float) -> bytes:
    now = time.monotonic()
    document = {
        "scope": scope,
        "frozen_at": frozen_at,
        "frozen_at_wall": time.time() - (now - frozen_at),
        "boot_id": read_boot_id(),
    }
    return encode_record(RecordType.SCOPE, json.dumps(document).encode())


def _flow_record(flow_id: int, snapshot: FlowSnapshot) -> bytes:
    body = _FLOW_ID.pack(flow_id) + json.dumps(snapshot_document(snapshot)).encode()
    return encode_record(RecordType.FLOW, body)


def _data_record(flow_id: int, seq: int, payload: bytes) -> bytes:
    return encode_record(RecordType.DATA, _DATA.pack(flow_id, seq) + payload)


def _acked_record(flow_id: int, state: AckedState) -> bytes:
    flags = (_FIN_FLAG if state.fin else 0) | (
        _TS_RECENT_FLAG if state.ts_recent is not None else 0
    )
    body = _ACKED.pack(
        flow_id,
        state.ack,
        state.right_edge,
        state.tsval,
        state.tsval_at,
        flags,
        state.ts_recent or 0,
    )
    return encode_record(RecordType.ACKED, body)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalWriter:
    """Append-only journal file of one scope, flushed by :meth:`commit`.

    Records are collected in memory and written with one write and one
    fdatasync per commit. After a failed write or flush the writer stays
    failed: the file may end in a torn record, so nothing appended after it
    could be read back, and the ACKs waiting for it must not be sent.
    """

    def __init__(self, path: Path, fd: int, flow_ids: dict[FlowKey, int]) -> None:
        self.path = path
        self._fd: int | None = fd
        self._flow_ids = flow_ids
        self._pending = bytearray()
        self.failed = False

    @classmethod
    def create(
        cls,
        path: Path,
        scope: str,
        frozen_at: float,
        flows: Sequence[tuple[FlowSnapshot, FlowHandover, float]] = (),
        *,
        thawed: bool = False,
    ) -> JournalWriter:
        """Write a new journal that contains FLOWS, replacing any file at PATH.

        The new file is complete and flushed before it replaces the old one,
        so a crash in between leaves one of the two, both readable. FLOWS are
        (original snapshot, hand-over so far, TSval time), as
        :meth:`JournalContents.recovered` returns them.

        Raises:
            JournalError: the file cannot be written.
        """
        flow_ids: dict[FlowKey, int] = {}
        content = bytearray(MAGIC)
        content += _scope_record(scope, frozen_at)
        for snapshot, handover, tsval_at in flows:
            flow_id = len(flow_ids)
            flow_ids[snapshot.key] = flow_id
            content += _flow_record(flow_id, snapshot)
            if handover.data:
                content += _data_record(flow_id, handover.start_seq, handover.data)
            ack = seq_add(handover.rcv_nxt, 1 if handover.fin else 0)
            state = AckedState(
                ack=ack,
                right_edge=handover.right_edge,
                tsval=handover.tsval,
                tsval_at=tsval_at,
                ts_recent=handover.ts_recent,
                fin=handover.fin,
            )
            content += _acked_record(flow_id, state)
        if thawed:
            content += encode_record(RecordType.THAWED, b"")
        temporary = path.with_name(path.name + ".tmp")
        fd = -1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _fsync_directory(path.parent.parent)
            fd = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600
            )
            _write_all(fd, bytes(content))
            os.fdatasync(fd)
            os.replace(temporary, path)
            _fsync_directory(path.parent)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            raise JournalError(f"cannot write journal {path}: {exc}") from None
        return cls(path, fd, flow_ids)

    def add_flow(self, snapshot: FlowSnapshot) -> None:
        if snapshot.key in self._flow_ids:
            return
        flow_id = len(self._flow_ids)
        self._flow_ids[snapshot.key] = flow_id
        self._pending += _flow_record(flow_id, snapshot)

    def add_data(self, key: FlowKey, seq: int, payload: bytes) -> None:
        self._pending += _data_record(self._flow_ids[key], seq, payload)

    def add_acked(self, key: FlowKey, state: AckedState) -> None:
        self._pending += _acked_record(self._flow_ids[key], state)

    def add_thawed(self) -> None:
        self._pending += encode_record(RecordType.THAWED, b"")

    def commit(self) -> bool:
        """Write and flush the records added since the last commit.

        Returns True when they are on disk. On failure the error is logged once
        and every later commit returns False.
        """
        if self.failed or self._fd is None:
            return False
        if not self._pending:
            return True
        try:
            _write_all(self._fd, bytes(self._pending))
            os.fdatasync(self._fd)
        except OSError as exc:
            self.failed = True
            log.error(
                "journal %s: write failed, so the shield sends no more ACKs for "
                "its flows: %s",
                self.path,
                exc,
            )
            return False
        self._pending.clear()
        return True

    def close(self) -> None:
        """Close the file; records not committed yet are dropped."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class ScopeJournals:
    """The journal writers of all frozen scopes, found by flow.

    The shield calls :meth:`record_data`, :meth:`record_acked`, :meth:`commit`
    and :meth:`is_durable`; the daemon opens and closes one writer per scope.
    """

    def __init__(self) -> None:
        self._writers: dict[str, JournalWriter] = {}
        self._scope_of: dict[FlowKey, str] = {}

    def open(
        self,
        scope: str,
        folder: Path,
        frozen_at: float,
        flows: Sequence[tuple[FlowSnapshot, FlowHandover, float]] = (),
        *,
        thawed: bool = False,
    ) -> None:
        """Start a new journal for SCOPE with FLOWS in it (see JournalWriter.create)."""
        self.close(scope)
        writer = JournalWriter.create(
            journal_path(folder), scope, frozen_at, flows, thawed=thawed
        )
        self._writers[scope] = writer
        for snapshot, _, _ in flows:
            self._scope_of[snapshot.key] = scope

    def writer(self, scope: str) -> JournalWriter | None:
        return self._writers.get(scope)

    def add_flow(self, scope: str, snapshot: FlowSnapshot) -> None:
        """Journal a new flow of SCOPE; without a journal its ACKs are withheld."""
        writer = self._writers.get(scope)
        if writer is None:
            log.error(
                "scope %s has no journal: the shield withholds the ACKs of %s",
                scope,
                snapshot.key,
            )
            return
        writer.add_flow(snapshot)
        self._scope_of[snapshot.key] = scope

    def mark_thawed(self, scope: str) -> None:
        writer = self._writers.get(scope)
        if writer is not None:
            writer.add_thawed()

    def close(self, scope: str, *, remove: bool = False) -> None:
        """Close SCOPE's journal, and delete the file when REMOVE is set."""
        writer = self._writers.pop(scope, None)
        self._scope_of = {k: s for k, s in self._scope_of.items() if s != scope}
        if writer is None:
            return
        writer.close()
        if remove:
            with contextlib.suppress(FileNotFoundError):
                writer.path.unlink()

    def close_all(self) -> None:
        for scope in list(self._writers):
            self.close(scope)

    # the shield's side

    def _writer_of(self, key: FlowKey) -> JournalWriter | None:
        scope = self._scope_of.get(key)
        return None if scope is None else self._writers.get(scope)

    def record_data(self, key: FlowKey, seq: int, payload: bytes) -> None:
        writer = self._writer_of(key)
        if writer is not None:
            writer.add_data(key, seq, payload)

    def record_acked(self, key: FlowKey, state: AckedState) -> None:
        writer = self._writer_of(key)
        if writer is not None:
            writer.add_acked(key, state)

    def commit(self) -> None:
        for writer in self._writers.values():
            writer.commit()

    def is_durable(self, key: FlowKey) -> bool:
        """Return True when the flow's records so far are on disk."""
        writer = self._writer_of(key)
        return writer is not None and not writer.failed


# reading


def _records(data: bytes, start: int) -> Iterator[tuple[int, RecordType, bytes]]:
    """Yield (end offset, type, body) for each intact record from START."""
    offset = start
    while offset + _HEADER.size <= len(data):
        length, kind = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length + _CRC.size
        if length > MAX_RECORD_BYTES or end > len(data):
            return
        header = data[offset : offset + _HEADER.size]
        body = data[offset + _HEADER.size : end - _CRC.size]
        (crc,) = _CRC.unpack_from(data, end - _CRC.size)
        if crc != zlib.crc32(body, zlib.crc32(header)):
            return
        try:
            record_type = RecordType(kind)
        except ValueError:
            return
        yield end, record_type, body
        offset = end


def read_journal(path: Path) -> JournalContents:
    """Read a journal, ignoring a torn tail.

    Raises:
        JournalError: the file cannot be read, is not a journal, lacks its
            scope record, or has a record that contradicts the ones before it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc.strerror}") from None
    if not data.startswith(MAGIC):
        raise JournalError(f"{path} is not a shieldproxy journal")
    scope: dict[str, object] | None = None
    flows: dict[int, JournaledFlow] = {}
    thawed = False
    valid = len(MAGIC)
    try:
        for end, kind, body in _records(data, len(MAGIC)):
            if kind is RecordType.SCOPE:
                scope = json.loads(body)
                if not isinstance(scope, dict):
                    raise JournalError("the scope record is not a JSON object")
            elif scope is None:
                raise JournalError("the scope record is not the first record")
            elif kind is RecordType.FLOW:
                (flow_id,) = _FLOW_ID.unpack_from(body)
                snapshot = snapshot_from_document(json.loads(body[_FLOW_ID.size :]))
                flows[flow_id] = JournaledFlow(snapshot)
            elif kind is RecordType.DATA:
                flow_id, seq = _DATA.unpack_from(body)
                _flow(flows, flow_id).add_data(seq, body[_DATA.size :])
            elif kind is RecordType.ACKED:
                flow_id, ack, edge, tsval, at, flags, recent = _ACKED.unpack(body)
                _flow(flows, flow_id).acked = AckedState(
                    ack=ack,
                    right_edge=edge,
                    tsval=tsval,
                    tsval_at=at,
                    ts_recent=recent if flags & _TS_RECENT_FLAG else None,
                    fin=bool(flags & _FIN_FLAG),
                )
            elif kind is RecordType.THAWED:
                thawed = True
            valid = end
    except (StateFileError, ValueError, struct.error) as exc:
        raise JournalError(f"invalid journal {path} at byte {valid}: {exc}") from None
    if scope is None:
        raise JournalError(f"journal {path} has no scope record")
    contents = JournalContents(
        scope=str(scope.get("scope", "")),
        frozen_at=_float(scope, "frozen_at"),
        thawed=thawed,
        flows=flows,
        valid_bytes=valid,
        file_bytes=len(data),
    )
    if scope.get("boot_id") != read_boot_id():
        _move_to_this_boot(contents, _float(scope, "frozen_at_wall"))
    return contents


def _flow(flows: dict[int, JournaledFlow], flow_id: int) -> JournaledFlow:
    try:
        return flows[flow_id]
    except KeyError:
        raise JournalError(
            f"record for flow {flow_id} before its flow record"
        ) from None


def _float(document: dict[str, object], name: str) -> float:
    value = document.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise JournalError(f"the scope record's {name!r} is not a number")
    return float(value)


def _move_to_this_boot(contents: JournalContents, frozen_at_wall: float) -> None:
    """Rebase monotonic times written before a reboot onto this boot's clock.

    The TSvals keep their journaled values from now on, which is at or above
    every TSval sent; the freeze age comes from the wall clock.
    """
    now = time.monotonic()
    contents.frozen_at = now - max(0.0, time.time() - frozen_at_wall)
    for flow in contents.flows.values():
        flow.snapshot = replace(flow.snapshot, taken_at=now)
        if flow.acked is not None:
            flow.acked = replace(flow.acked, tsval_at=now)


# command line


def _find_flow(contents: JournalContents, text: str) -> JournaledFlow:
    for flow in contents.flows.values():
        if str(flow.snapshot.key) == text:
            return flow
    known = ", ".join(str(f.snapshot.key) for f in contents.flows.values())
    raise JournalError(f"flow {text!r} not found; the journal has: {known or 'none'}")


def journal_listing(contents: JournalContents) -> dict[str, object]:
    """Return the journal's scope and one summary per flow, ready for JSON.

    ``missing_bytes`` counts acknowledged bytes the journal lacks after the
    last contiguous byte. Nonzero is a bug, and an export stops at the gap.
    """
    flows = []
    for flow in contents.flows.values():
        handover, _ = flow.handover()
        flows.append(
            {
                "flow": str(flow.snapshot.key),
                "start_seq": handover.start_seq,
                "rcv_nxt": handover.rcv_nxt,
                "right_edge": handover.right_edge,
                "acknowledged_bytes": len(handover.data),
                "unacknowledged_bytes": handover.discarded_bytes,
                "missing_bytes": flow.missing_bytes,
                "fin": handover.fin,
            }
        )
    return {
        "scope": contents.scope,
        "thawed": contents.thawed,
        "torn_tail_bytes": contents.file_bytes - contents.valid_bytes,
        "flows": flows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shieldproxy.journal",
        description="Inspect a shield daemon's journal (STATE_DIR/SCOPE/journal).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print the journal's flows as JSON")
    listing.add_argument("journal", type=Path)
    export = commands.add_parser(
        "export", help="write the bytes acknowledged for one flow to a file"
    )
    export.add_argument("journal", type=Path)
    export.add_argument(
        "--flow", required=True, help="flow as 'shieldproxy flows' prints it"
    )
    export.add_argument("--out", required=True, type=Path, help="file to write")
    args = parser.parse_args(argv)

    try:
        contents = read_journal(args.journal)
        if args.command == "list":
            print(json.dumps(journal_listing(contents), indent=2))
            return 0
        handover, _ = _find_flow(contents, args.flow).handover()
        args.out.write_bytes(handover.data)
    except (JournalError, OSError) as exc:
        print(f"shieldproxy.journal {args.command}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(handover.data)} bytes from sequence {handover.start_seq}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
