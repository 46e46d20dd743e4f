import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from shieldproxy import journal as journal_module
from shieldproxy.config import ShieldConfig
from shieldproxy.journal import (
    MAGIC,
    AckedState,
    JournalError,
    JournalWriter,
    RecordType,
    ScopeJournals,
    encode_record,
    journal_path,
    main,
    read_journal,
)
from shieldproxy.shield import Shield
from shieldproxy.state import continuation
from shieldproxy.tcp.segment import (
    ACK,
    Segment,
    TcpOptions,
    build_packet,
    parse_packet_untrusted,
)
from shieldproxy.tcp.seq import seq_add, seq_diff
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

KEY = FlowKey.create("198.18.2.2", 5001, "198.18.1.2", 40000)
OTHER_KEY = FlowKey.create("198.18.2.2", 5001, "198.18.1.2", 40001)
RCV_NXT = 2**32 - 1000  # close to the wrap, so every test crosses it
SND_NXT = 7000
TSVAL = 100_000
PEER_TSVAL = 3_000_000_000  # above 2**31, where a TSecr of 0 would fail PAWS
FROZEN_AT = 5.0


def snapshot(key=KEY, *, window=65536, wscale=0, taken_at=10.0):
    return FlowSnapshot(
        key=key,
        rcv_nxt=RCV_NXT,
        rcv_wup=RCV_NXT,
        rcv_wnd=window,
        snd_una=SND_NXT,
        snd_nxt=SND_NXT,
        rcv_wscale=wscale,
        snd_wscale=7,
        mss=1460,
        sack_ok=True,
        timestamps_ok=True,
        tsval=TSVAL,
        taken_at=taken_at,
        ts_recent=None,
    )


def peer_segment(offset, payload=b"", *, key=KEY, flags=ACK, tsval=PEER_TSVAL):
    return Segment(
        version=4,
        src=key.peer_addr,
        dst=key.container_addr,
        sport=key.peer_port,
        dport=key.container_port,
        seq=seq_add(RCV_NXT, offset),
        ack=SND_NXT,
        flags=flags,
        window=1000,
        options=TcpOptions(timestamp=(tsval, TSVAL)),
        payload=payload,
    )


class FakePacket:
    def __init__(self, segment):
        self._payload = build_packet(segment)
        self.verdict = None

    def get_payload(self):
        return self._payload

    def retain(self):
        pass

    def accept(self):
        self.verdict = "accept"

    def drop(self):
        self.verdict = "drop"


class ListSender:
    def __init__(self, events=None):
        self.segments = []
        self.events = events if events is not None else []

    def send(self, packet, version, dst):
        segment = parse_packet_untrusted(packet)
        self.segments.append(segment)
        self.events.append(("send", segment.ack))
        return True


class RecordingJournal:
    """An AckJournal that logs each call, to check the order of commit and send."""

    def __init__(self, events, *, durable=True):
        self.events = events
        self.durable = durable
        self.acked = {}

    def record_data(self, key, seq, payload):
        self.events.append(("data", seq, len(payload)))

    def record_acked(self, key, state):
        self.acked[key] = state
        self.events.append(("acked", state.ack))

    def commit(self):
        self.events.append(("commit",))

    def is_durable(self, key):
        return self.durable


def pattern(start, length):
    return bytes((start + i) % 251 for i in range(length))


# file format


def write_flows(path, scope, flows, *, fin=False):
    """Write a journal of SCOPE with FLOWS: {key: (data ranges, ack offset)}."""
    writer = JournalWriter.create(path, scope, FROZEN_AT)
    for key, (data_ranges, ack_offset) in flows.items():
        writer.add_flow(snapshot(key))
        for start, length in data_ranges:
            writer.add_data(key, seq_add(RCV_NXT, start), pattern(start, length))
        writer.add_acked(
            key,
            AckedState(
                ack=seq_add(RCV_NXT, ack_offset),
                right_edge=seq_add(RCV_NXT, 70000),
                tsval=TSVAL + 500,
                tsval_at=10.5,
                ts_recent=PEER_TSVAL,
                fin=fin,
            ),
        )
    assert writer.commit()
    writer.close()


def write_flow(path, *, data_ranges, ack_offset, fin=False):
    write_flows(path, "web", {KEY: (data_ranges, ack_offset)}, fin=fin)


def test_round_trip_hands_over_acknowledged_bytes(tmp_path):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 1000), (1000, 500)], ack_offset=1500)
    contents = read_journal(path)
    assert contents.scope == "web"
    assert contents.frozen_at == FROZEN_AT
    assert contents.thawed is False
    assert contents.valid_bytes == contents.file_bytes
    ((original, handover, tsval_at),) = contents.recovered()
    assert original == snapshot()
    assert handover.start_seq == RCV_NXT
    assert handover.data == pattern(0, 1500)
    assert handover.rcv_nxt == seq_add(RCV_NXT, 1500)
    assert handover.right_edge == seq_add(RCV_NXT, 70000)
    assert handover.tsval == TSVAL + 500
    assert handover.ts_recent == PEER_TSVAL
    assert handover.fin is False
    assert tsval_at == 10.5


def test_bytes_past_last_ack_not_handed_over(tmp_path):
    path = tmp_path / "journal"
    # out of order first, then the gap fills; the ACK stops short of the end
    write_flow(path, data_ranges=[(1000, 1000), (0, 1000)], ack_offset=1200)
    ((_, handover, _),) = read_journal(path).recovered()
    assert handover.data == pattern(0, 1200)
    assert handover.discarded_bytes == 800


def test_bytes_before_snapshot_trimmed(tmp_path):
    path = tmp_path / "journal"
    writer = JournalWriter.create(path, "web", FROZEN_AT)
    writer.add_flow(snapshot())
    # a retransmission that starts 100 bytes before the snapshot's rcv_nxt
    writer.add_data(KEY, seq_add(RCV_NXT, -100), b"x" * 100 + pattern(0, 300))
    writer.add_acked(
        KEY, AckedState(seq_add(RCV_NXT, 300), RCV_NXT, 1, 1.0, None, False)
    )
    assert writer.commit()
    ((_, handover, _),) = read_journal(path).recovered()
    assert handover.data == pattern(0, 300)


def test_fin_acknowledged_after_data(tmp_path):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 400)], ack_offset=401, fin=True)
    contents = read_journal(path)
    ((_, handover, _),) = contents.recovered()
    assert handover.data == pattern(0, 400)
    assert handover.fin is True
    assert contents.flows[0].missing_bytes == 0


def test_missing_acknowledged_bytes_counted(tmp_path):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 400)], ack_offset=1000)
    contents = read_journal(path)
    assert contents.flows[0].missing_bytes == 600
    ((_, handover, _),) = contents.recovered()
    assert handover.data == pattern(0, 400)


def test_flow_without_ack_keeps_snapshot(tmp_path):
    path = tmp_path / "journal"
    writer = JournalWriter.create(path, "web", FROZEN_AT)
    writer.add_flow(snapshot())
    writer.add_data(KEY, RCV_NXT, b"never acknowledged")
    assert writer.commit()
    ((_, handover, tsval_at),) = read_journal(path).recovered()
    assert handover.data == b""
    assert handover.right_edge == snapshot().right_edge
    assert handover.tsval == TSVAL
    assert tsval_at == snapshot().taken_at


def test_torn_tail_ignored(tmp_path):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 1000)], ack_offset=1000)
    complete = path.stat().st_size
    record = encode_record(RecordType.DATA, b"\0" * 8 + b"late bytes")
    with open(path, "ab") as file:
        file.write(record[:-3])  # the process died in the middle of this write
    contents = read_journal(path)
    assert contents.valid_bytes == complete
    assert contents.file_bytes == complete + len(record) - 3
    ((_, handover, _),) = contents.recovered()
    assert handover.data == pattern(0, 1000)


def test_damaged_record_ends_journal(tmp_path):
    path = tmp_path / "journal"
    writer = JournalWriter.create(path, "web", FROZEN_AT)
    writer.add_flow(snapshot())
    writer.add_data(KEY, RCV_NXT, pattern(0, 100))
    writer.add_acked(
        KEY, AckedState(seq_add(RCV_NXT, 100), RCV_NXT, 1, 1.0, None, False)
    )
    assert writer.commit()
    good = path.stat().st_size
    writer.add_data(KEY, seq_add(RCV_NXT, 100), pattern(100, 100))
    writer.add_acked(
        KEY, AckedState(seq_add(RCV_NXT, 200), RCV_NXT, 2, 2.0, None, False)
    )
    assert writer.commit()
    writer.close()
    content = bytearray(path.read_bytes())
    content[good + 10] ^= 0xFF  # inside the second DATA record
    path.write_bytes(bytes(content))
    contents = read_journal(path)
    assert contents.valid_bytes == good
    ((_, handover, _),) = contents.recovered()
    assert handover.data == pattern(0, 100)


def test_not_a_journal_rejected(tmp_path):
    path = tmp_path / "journal"
    path.write_bytes(b"something else")
    with pytest.raises(JournalError, match="is not a shieldproxy journal"):
        read_journal(path)


def test_journal_without_scope_record_rejected(tmp_path):
    path = tmp_path / "journal"
    path.write_bytes(MAGIC)
    with pytest.raises(JournalError, match="has no scope record"):
        read_journal(path)


def test_record_of_unknown_flow_rejected(tmp_path):
    path = tmp_path / "journal"
    writer = JournalWriter.create(path, "web", FROZEN_AT)
    writer.close()
    with open(path, "ab") as file:
        file.write(encode_record(RecordType.DATA, b"\x07\0\0\0\0\0\0\0data"))
    with pytest.raises(JournalError, match="flow 7 before its flow record"):
        read_journal(path)


def test_create_with_flows_round_trips(tmp_path):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 3000)], ack_offset=2500)
    recovered = read_journal(path).recovered()
    compacted = tmp_path / "compacted" / "journal"
    writer = JournalWriter.create(compacted, "web", FROZEN_AT, recovered)
    writer.close()
    ((snapshot_before, before, tsval_at_before),) = recovered
    ((snapshot_after, after, tsval_at_after),) = read_journal(compacted).recovered()
    assert snapshot_after == snapshot_before
    # the 500 bytes never acknowledged are left out
    assert after == replace(before, discarded_bytes=0)
    assert before.discarded_bytes == 500
    assert tsval_at_after == tsval_at_before
    assert not compacted.with_name("journal.tmp").exists()


def test_other_boot_rebases_clock(tmp_path, monkeypatch):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 100)], ack_offset=100)
    monkeypatch.setattr(journal_module, "read_boot_id", lambda: "another boot")
    monkeypatch.setattr(journal_module.time, "monotonic", lambda: 1234.0)
    ((original, handover, tsval_at),) = read_journal(path).recovered()
    # the journaled TSval stays, counted from now on this boot's clock
    assert handover.tsval == TSVAL + 500
    assert tsval_at == 1234.0
    assert original.taken_at == 1234.0


def test_failed_write_fails_writer(tmp_path):
    path = tmp_path / "journal"
    writer = JournalWriter.create(path, "web", FROZEN_AT)
    writer.add_flow(snapshot())
    os.close(writer._fd)
    writer._fd = os.open(os.devnull, os.O_RDONLY)  # writes fail with EBADF
    assert writer.commit() is False
    assert writer.failed
    writer.add_data(KEY, RCV_NXT, b"more")
    assert writer.commit() is False
    writer.close()


def test_scope_journals_remove_on_close(tmp_path):
    journals = ScopeJournals()
    folder = tmp_path / "web"
    journals.open("web", folder, FROZEN_AT)
    journals.add_flow("web", snapshot())
    journals.commit()
    assert journals.is_durable(KEY)
    assert not journals.is_durable(OTHER_KEY)
    assert journal_path(folder).exists()
    journals.close("web", remove=True)
    assert not journal_path(folder).exists()
    assert not journals.is_durable(KEY)


# the shield's group commit


def test_shield_sends_acks_after_commit():
    events = []
    shield = Shield(ListSender(events), journal=RecordingJournal(events))
    shield.add_flow(snapshot(), 10.0)
    shield.handle_packet(FakePacket(peer_segment(0, b"a" * 1000)), 10.001)
    shield.handle_packet(FakePacket(peer_segment(1000, b"b" * 1000)), 10.002)
    assert ("send", seq_add(RCV_NXT, 1000)) not in events
    shield.flush(10.003)
    assert events == [
        ("data", RCV_NXT, 1000),
        ("data", seq_add(RCV_NXT, 1000), 1000),
        ("acked", seq_add(RCV_NXT, 2000)),
        ("commit",),
        ("send", seq_add(RCV_NXT, 1000)),
        ("send", seq_add(RCV_NXT, 2000)),
    ]


def test_shield_journals_ack_state():
    events = []
    journal = RecordingJournal(events)
    shield = Shield(ListSender(events), journal=journal)
    flow = shield.add_flow(snapshot(), 10.0)
    shield.handle_packet(FakePacket(peer_segment(0, b"a" * 100)), 10.25)
    shield.flush(10.25)
    state = journal.acked[KEY]
    assert state.ack == flow.ack_sent
    assert state.right_edge == flow.right_edge
    assert state.tsval == TSVAL + 250
    assert state.tsval_at == 10.25
    assert state.ts_recent == PEER_TSVAL
    assert state.fin is False


def test_shield_journals_only_window(tmp_path):
    events = []
    shield = Shield(ListSender(events), journal=RecordingJournal(events))
    shield.add_flow(snapshot(window=1000), 10.0)
    shield.handle_packet(FakePacket(peer_segment(0, b"a" * 1400)), 10.001)
    assert ("data", RCV_NXT, 1000) in events


def test_shield_commits_full_batch():
    events = []
    shield = Shield(
        ListSender(events), journal=RecordingJournal(events), commit_max_acks=2
    )
    shield.add_flow(snapshot(), 10.0)
    shield.handle_packet(FakePacket(peer_segment(0, b"a" * 100)), 10.0)
    assert ("commit",) not in events
    shield.handle_packet(FakePacket(peer_segment(100, b"a" * 100)), 10.0)
    assert events.count(("commit",)) == 1
    assert events[-1] == ("send", seq_add(RCV_NXT, 200))


def test_shield_commits_after_interval():
    events = []
    shield = Shield(
        ListSender(events), journal=RecordingJournal(events), commit_interval_s=0.005
    )
    shield.add_flow(snapshot(), 10.0)
    shield.handle_packet(FakePacket(peer_segment(0, b"a" * 100)), 10.0)
    assert ("commit",) not in events
    shield.handle_packet(FakePacket(peer_segment(100, b"a" * 100)), 10.006)
    assert events.count(("commit",)) == 1


def test_shield_withholds_acks_of_failed_journal():
    events = []
    sender = ListSender(events)
    shield = Shield(sender, journal=RecordingJournal(events, durable=False))
    shield.add_flow(snapshot(), 10.0)
    packet = FakePacket(peer_segment(0, b"a" * 100))
    shield.handle_packet(packet, 10.0)
    shield.flush(10.0)
    assert packet.verdict == "drop"
    assert sender.segments == []
    assert shield.counters.acks_withheld == 1


def test_shield_without_journal_sends_at_once():
    sender = ListSender()
    shield = Shield(sender)
    shield.add_flow(snapshot(), 10.0)
    shield.handle_packet(FakePacket(peer_segment(0, b"a" * 100)), 10.0)
    assert [s.ack for s in sender.segments] == [seq_add(RCV_NXT, 100)]


def test_timer_ack_committed_first():
    events = []
    shield = Shield(ListSender(events), journal=RecordingJournal(events))
    # with window scale 7 the ACK stops on the 128-byte grid; the tail timer
    # acknowledges the rest later
    shield.add_flow(snapshot(wscale=7), 10.0)
    shield.handle_packet(FakePacket(peer_segment(0, b"a" * 1000)), 10.0)
    shield.flush(10.0)
    events.clear()
    shield.on_timer(10.1)
    assert events == [
        ("acked", seq_add(RCV_NXT, 1000)),
        ("commit",),
        ("send", seq_add(RCV_NXT, 1000)),
    ]


# replay through real journal files


def absorb(shield, offsets_and_lengths, now):
    for offset, length in offsets_and_lengths:
        segment = peer_segment(offset, pattern(offset, length))
        shield.handle_packet(FakePacket(segment), now)
    shield.flush(now)


def test_replay_matches_shield_handover(tmp_path):
    journals = ScopeJournals()
    folder = tmp_path / "web"
    journals.open("web", folder, FROZEN_AT)
    shield = Shield(ListSender(), journal=journals)
    journals.add_flow("web", snapshot(wscale=7))
    flow = shield.add_flow(snapshot(wscale=7), 10.0)
    # in order, a gap, its fill, then a duplicate
    absorb(shield, [(0, 1448), (2896, 1448), (1448, 1448), (0, 1448)], 10.1)
    ((_, before, _),) = read_journal(journal_path(folder)).recovered()
    # the ACK stopped on the window-scale grid, and so does the replay
    assert len(before.data) == seq_diff(flow.ack_sent, RCV_NXT)
    assert len(before.data) < 3 * 1448
    expected = shield.handover(KEY, 10.2)
    ((_, after, _),) = read_journal(journal_path(folder)).recovered()
    # the hand-over's final ACK reached the journal before it was sent
    assert after.data == expected.data
    assert after.data == pattern(0, 3 * 1448)
    assert after.right_edge == expected.right_edge


def test_resumed_flow_continues_journal(tmp_path):
    folder = tmp_path / "web"
    first = ScopeJournals()
    first.open("web", folder, FROZEN_AT)
    shield = Shield(ListSender(), journal=first)
    first.add_flow("web", snapshot())
    shield.add_flow(snapshot(), 10.0)
    absorb(shield, [(0, 2000)], 10.1)
    # the first process dies here, without closing anything
    recovered = read_journal(journal_path(folder)).recovered()
    ((original, handover, tsval_at),) = recovered
    assert handover.data == pattern(0, 2000)

    second = ScopeJournals()
    second.open("web", folder, FROZEN_AT, recovered)
    resumed = Shield(ListSender(), journal=second)
    resumed.add_flow(continuation(original, handover, tsval_at), tsval_at)
    absorb(resumed, [(1000, 2000), (3000, 1000)], 10.3)
    ((_, final, _),) = read_journal(journal_path(folder)).recovered()
    assert final.start_seq == RCV_NXT
    assert final.data == pattern(0, 4000)
    assert final.tsval >= handover.tsval


# settings and command line


def test_durability_defaults_to_journal():
    config = ShieldConfig.model_validate(
        {"mode": "gateway", "scopes": [{"name": "web", "addresses": ["198.18.2.2"]}]}
    )
    assert config.durability == "journal"


def test_invalid_durability_rejected():
    with pytest.raises(ValidationError, match="durability"):
        ShieldConfig.model_validate(
            {
                "mode": "gateway",
                "scopes": [{"name": "web", "addresses": ["198.18.2.2"]}],
                "durability": "disk",
            }
        )


def test_export_writes_acknowledged_bytes(tmp_path, capsys):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 2000)], ack_offset=1500)
    out = tmp_path / "flow.bin"
    assert main(["export", str(path), "--flow", str(KEY), "--out", str(out)]) == 0
    assert out.read_bytes() == pattern(0, 1500)
    assert "wrote 1500 bytes" in capsys.readouterr().out
    assert main(["list", str(path)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["flows"][0]["flow"] == str(KEY)
    assert listing["flows"][0]["acknowledged_bytes"] == 1500
    assert listing["flows"][0]["unacknowledged_bytes"] == 500


def test_export_unknown_flow_fails(tmp_path, capsys):
    path = tmp_path / "journal"
    write_flow(path, data_ranges=[(0, 10)], ack_offset=10)
    out = Path(tmp_path / "flow.bin")
    assert main(["export", str(path), "--flow", "nope", "--out", str(out)]) == 1
    assert "flow 'nope' not found" in capsys.readouterr().err
    assert not out.exists()
