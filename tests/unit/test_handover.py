import json

import pytest

from shieldproxy.handover import (
    HandoverFileError,
    load_handover,
    restored_right_edge,
    save_handover,
)
from shieldproxy.tcp.flow import FlowHandover
from shieldproxy.tcp.seq import seq_add
from shieldproxy.tcp.snapshot import FlowKey

KEY = FlowKey.create("2001:2:0:2::2", 5001, "2001:2:0:1::2", 40000)


def handover(data=b"abc" * 100, right_edge_offset=1000):
    start = 2**32 - 100
    return FlowHandover(
        key=KEY,
        start_seq=start,
        data=data,
        rcv_nxt=seq_add(start, len(data)),
        fin=False,
        reset=False,
        right_edge=seq_add(start, right_edge_offset),
        tsval=12345,
        ts_recent=777,
        discarded_bytes=3,
    )


def test_round_trip(tmp_path):
    original = handover()
    path = save_handover(original, tmp_path, taken_at=42.5)
    loaded, taken_at = load_handover(path)
    assert loaded == original
    assert taken_at == 42.5
    # IPv6 colons never reach the file name
    assert ":" not in path.name


def test_truncated_data_rejected(tmp_path):
    path = save_handover(handover(), tmp_path, taken_at=1.0)
    data_file = tmp_path / json.loads(path.read_text())["data_file"]
    data_file.write_bytes(b"abc")
    with pytest.raises(HandoverFileError, match="has 3 bytes.*incomplete"):
        load_handover(path)


def test_bad_field_rejected(tmp_path):
    path = save_handover(handover(), tmp_path, taken_at=1.0)
    document = json.loads(path.read_text())
    document["rcv_nxt"] = "soon"
    path.write_text(json.dumps(document))
    with pytest.raises(HandoverFileError, match="field 'rcv_nxt'"):
        load_handover(path)


def test_wrong_format_rejected(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(HandoverFileError, match="not a shieldproxy-handover file"):
        load_handover(path)


def test_restored_edge_bounded_by_free_buffer():
    flow = handover(data=b"x" * 100, right_edge_offset=100)
    # 1000 bytes of buffer, 600 queued: half of the 400 left is offered
    edge = restored_right_edge(
        flow, window_bytes=10_000, rcvbuf_bytes=1000, queued_bytes=600
    )
    assert edge == seq_add(flow.rcv_nxt, 200)


def test_restored_edge_takes_dump_window_when_smaller():
    flow = handover(data=b"x" * 100, right_edge_offset=100)
    edge = restored_right_edge(
        flow, window_bytes=50, rcvbuf_bytes=10**6, queued_bytes=0
    )
    assert edge == seq_add(flow.rcv_nxt, 50)


def test_restored_edge_never_below_shield_edge():
    flow = handover(data=b"x" * 100, right_edge_offset=5000)
    edge = restored_right_edge(
        flow, window_bytes=10_000, rcvbuf_bytes=1000, queued_bytes=1000
    )
    assert edge == flow.right_edge + 1
    scaled = restored_right_edge(
        flow,
        window_bytes=10_000,
        rcvbuf_bytes=1000,
        queued_bytes=1000,
        scale_unit=128,
    )
    # one scale unit past the shield's edge, so rounding by the restored
    # kernel never shows less than the shield did
    assert scaled == flow.right_edge + 128
