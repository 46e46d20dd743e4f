"""Reading and rewriting CRIU image folders built with pycriu's own writer."""

import base64
import os
import random
import stat
import struct
import time

import pytest

from shieldproxy.criu import images, locate
from shieldproxy.criu.images import (
    ImageError,
    read_stream_snapshot,
    read_tcp_flows,
    restore_backup,
    rewrite_tcp_flow,
    stream_image_name,
    to_snapshot,
)
from shieldproxy.tcp.seq import seq_add

# pycriu's dict converter calls a protobuf API that protobuf 6 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:label\\(\\) is deprecated:DeprecationWarning"
)


@pytest.fixture
def pycriu_images():
    return pytest.importorskip("pycriu.images")


FLOW_V4 = {
    "ino": 0x1A2B,
    "family": "INET",
    "local": ("198.18.2.2", 5001),
    "remote": ("198.18.1.2", 40000),
}
FLOW_V6 = {
    "ino": 77,
    "family": "INET6",
    "local": ("2001:2:0:2::2", 6379),
    "remote": ("2001:2:0:1::2", 40001),
}

RECV = b"unread-by-the-app"
SEND = b"sent-unacked|unsent"
UNSENT = len(b"unsent")
INQ_SEQ = 2**32 - 5  # the receive queue wraps around 2**32
OUTQ_SEQ = 1_000_000
TIMESTAMP = 987_654_320
MTIME_NS = 1_700_000_000_123_456_789


def socket_entry(flow, state="ESTABLISHED", proto="TCP", sock_type="STREAM"):
    return {
        "id": flow["ino"] + 1000,
        "ino": flow["ino"],
        "family": flow["family"],
        "type": sock_type,
        "proto": proto,
        "state": state,
        "src_port": flow["local"][1],
        "dst_port": flow["remote"][1],
        "flags": 2,
        "backlog": 0,
        "src_addr": [flow["local"][0]],
        "dst_addr": [flow["remote"][0]],
        "fown": {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0},
        "opts": {
            "so_sndbuf": 46080,
            "so_rcvbuf": 131072,
            "so_snd_tmo_sec": 0,
            "so_snd_tmo_usec": 0,
            "so_rcv_tmo_sec": 0,
            "so_rcv_tmo_usec": 0,
        },
    }


def stream_entry(recv=RECV, send=SEND, **overrides):
    entry = {
        "inq_len": len(recv),
        "inq_seq": INQ_SEQ,
        "outq_len": len(send),
        "outq_seq": OUTQ_SEQ,
        "opt_mask": images.TCPI_OPT_TIMESTAMPS
        | images.TCPI_OPT_SACK
        | images.TCPI_OPT_WSCALE,
        "snd_wscale": 7,
        "rcv_wscale": 9,
        "mss_clamp": 1448,
        "timestamp": TIMESTAMP,
        "unsq_len": UNSENT,
        "snd_wl1": seq_add(INQ_SEQ, -100),
        "snd_wnd": 64000,
        "max_window": 65000,
        "rcv_wnd": 60000,
        "rcv_wup": seq_add(INQ_SEQ, -10),
        "extra": {
            "inq": base64.encodebytes(recv).decode(),
            "outq": base64.encodebytes(send).decode(),
        },
    }
    for name, value in overrides.items():
        if value is None:
            entry.pop(name)
        else:
            entry[name] = value
    return entry


def write_image(pycriu_images, path, magic, entries):
    with path.open("wb") as file:
        pycriu_images.dump({"magic": magic, "entries": entries}, file)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))


def make_image_dir(pycriu_images, folder, flows=(FLOW_V4, FLOW_V6), **overrides):
    """Write files.img with FLOWS plus a LISTEN and a UDP socket, which are no flows."""
    folder.mkdir(exist_ok=True)
    listener = {**FLOW_V4, "ino": 5, "remote": ("0.0.0.0", 0)}
    udp = {**FLOW_V4, "ino": 6}
    entries = [
        {"type": "INETSK", "id": 1, "isk": socket_entry(listener, state="LISTEN")},
        {
            "type": "INETSK",
            "id": 2,
            "isk": socket_entry(udp, proto="UDP", sock_type="DGRAM", state="CLOSE"),
        },
    ]
    for index, flow in enumerate(flows):
        state = flow.get("state", "ESTABLISHED")
        entries.append(
            {"type": "INETSK", "id": 10 + index, "isk": socket_entry(flow, state)}
        )
        write_image(
            pycriu_images,
            folder / stream_image_name(flow["ino"]),
            "TCP_STREAM",
            [stream_entry(**overrides)],
        )
    write_image(pycriu_images, folder / "files.img", "FILES", entries)
    return folder


def stream_path(folder, flow=FLOW_V4):
    return folder / stream_image_name(flow["ino"])


# --- reading ------------------------------------------------------------------


def test_read_returns_established_flows(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    flows = read_tcp_flows(folder)
    assert [flow.inode for flow in flows] == [FLOW_V4["ino"], FLOW_V6["ino"]]
    v4, v6 = flows
    assert v4.family == 4
    assert (v4.local_addr, v4.local_port) == FLOW_V4["local"]
    assert (v4.remote_addr, v4.remote_port) == FLOW_V4["remote"]
    assert v6.family == 6
    assert (v6.local_addr, v6.local_port) == FLOW_V6["local"]
    assert (v6.remote_addr, v6.remote_port) == FLOW_V6["remote"]


def test_read_fields(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    flow = read_tcp_flows(folder)[0]
    assert flow.inq_len == len(RECV)
    assert flow.inq_seq == INQ_SEQ
    assert flow.outq_len == len(SEND)
    assert flow.outq_seq == OUTQ_SEQ
    assert flow.unsq_len == UNSENT
    assert flow.snd_wscale == 7
    assert flow.rcv_wscale == 9
    assert flow.mss_clamp == 1448
    assert flow.timestamp == TIMESTAMP
    assert flow.snd_wl1 == seq_add(INQ_SEQ, -100)
    assert flow.snd_wnd == 64000
    assert flow.max_window == 65000
    assert flow.rcv_wnd == 60000
    assert flow.rcv_wup == seq_add(INQ_SEQ, -10)
    assert flow.rcvbuf == 131072
    assert flow.sndbuf == 46080
    assert flow.recv_queue == RECV
    assert flow.send_queue == SEND
    assert flow.sack_ok
    assert flow.timestamps_ok
    assert flow.wscale_ok
    assert flow.snd_una == OUTQ_SEQ - len(SEND)
    assert flow.snd_nxt == OUTQ_SEQ - UNSENT
    assert flow.stream_image == stream_path(folder)
    assert flow.dumped_at == MTIME_NS / 1e9


def test_read_without_options(pycriu_images, tmp_path):
    folder = make_image_dir(
        pycriu_images,
        tmp_path / "img",
        flows=[FLOW_V4],
        opt_mask=0,
        rcv_wscale=None,
        timestamp=None,
    )
    flow = read_tcp_flows(folder)[0]
    assert not flow.sack_ok
    assert not flow.timestamps_ok
    assert not flow.wscale_ok
    assert flow.snd_wscale == 0
    assert flow.rcv_wscale == 0
    assert flow.timestamp == 0


def test_read_empty_queues(pycriu_images, tmp_path):
    folder = make_image_dir(
        pycriu_images,
        tmp_path / "img",
        flows=[FLOW_V4],
        recv=b"",
        send=b"",
        unsq_len=0,
    )
    flow = read_tcp_flows(folder)[0]
    assert flow.recv_queue == b""
    assert flow.send_queue == b""


def test_read_folder_without_tcp_flows(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img", flows=[])
    assert read_tcp_flows(folder) == []


def test_to_snapshot(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    flow = read_tcp_flows(folder)[1]
    snapshot = to_snapshot(flow, taken_at=12.5)
    assert str(snapshot.key) == "[2001:2:0:1::2]:40001->[2001:2:0:2::2]:6379"
    assert snapshot.rcv_nxt == INQ_SEQ
    assert snapshot.rcv_wup == flow.rcv_wup
    assert snapshot.rcv_wnd == 60000
    assert snapshot.right_edge == seq_add(INQ_SEQ, 60000 - 10)
    assert snapshot.snd_una == flow.snd_una
    assert snapshot.snd_nxt == flow.snd_nxt
    assert snapshot.rcv_wscale == 9
    assert snapshot.snd_wscale == 7
    assert snapshot.mss == 1448
    assert snapshot.sack_ok
    assert snapshot.timestamps_ok
    assert snapshot.tsval == TIMESTAMP
    assert snapshot.taken_at == 12.5
    assert snapshot.ts_recent is None


# CRIU's libsoccr stores outq_seq with the local FIN counted in the states
# after a local close, but outq_len and unsq_len without it.
FIN_DATA_END = OUTQ_SEQ - 1


@pytest.mark.parametrize(
    ("state", "stream", "snd_una", "snd_nxt", "peer_fin"),
    [
        # the FIN waits behind unsent data
        ("FIN_WAIT1", {}, FIN_DATA_END - len(SEND), FIN_DATA_END - UNSENT, False),
        # every byte and the FIN left the host
        ("FIN_WAIT1", {"unsq_len": 0}, FIN_DATA_END - len(SEND), OUTQ_SEQ, False),
        ("FIN_WAIT2", {"outq_len": 0, "unsq_len": 0}, OUTQ_SEQ, OUTQ_SEQ, False),
        ("CLOSE_WAIT", {}, OUTQ_SEQ - len(SEND), OUTQ_SEQ - UNSENT, True),
        ("LAST_ACK", {"unsq_len": 0}, FIN_DATA_END - len(SEND), OUTQ_SEQ, True),
        ("CLOSING", {"unsq_len": 0}, FIN_DATA_END - len(SEND), OUTQ_SEQ, True),
    ],
)
def test_half_closed_flow_read(
    pycriu_images, tmp_path, state, stream, snd_una, snd_nxt, peer_fin
):
    send = SEND if stream.get("outq_len") != 0 else b""
    # pycriu's table of state names lacks CLOSING, so it goes in as a number
    stored_state = 11 if state == "CLOSING" else state
    folder = make_image_dir(
        pycriu_images,
        tmp_path / "img",
        flows=[{**FLOW_V4, "state": stored_state}],
        send=send,
        **stream,
    )
    (flow,) = read_tcp_flows(folder)
    assert images.TCP_STATES[flow.state] == state
    assert flow.snd_una == snd_una
    assert flow.snd_nxt == snd_nxt
    snapshot = to_snapshot(flow, taken_at=1.0)
    assert snapshot.snd_una == snd_una
    assert snapshot.snd_nxt == snd_nxt
    assert snapshot.rcv_nxt == INQ_SEQ
    assert snapshot.peer_fin is peer_fin
    # the daemon reads the stream image during the dump, before files.img
    early = read_stream_snapshot(
        stream_path(folder), flow.key, state=flow.state, taken_at=1.0
    )
    assert early == snapshot


def test_rewrite_rejects_bytes_after_peer_fin(pycriu_images, tmp_path):
    folder = make_image_dir(
        pycriu_images, tmp_path / "img", flows=[{**FLOW_V4, "state": "CLOSE_WAIT"}]
    )
    with pytest.raises(ValueError, match="CLOSE_WAIT: the peer's FIN ends its data"):
        rewrite_tcp_flow(
            folder,
            FLOW_V4["ino"],
            extra_bytes=b"x",
            rcv_wnd=60000,
            rcv_wup=INQ_SEQ,
            timestamp=None,
            backup_dir=tmp_path / "backup",
        )
    assert not (tmp_path / "backup").exists()


def test_rewrite_peer_fin_flow_sets_clock(pycriu_images, tmp_path):
    folder = make_image_dir(
        pycriu_images, tmp_path / "img", flows=[{**FLOW_V4, "state": "LAST_ACK"}]
    )
    rewritten = rewrite_tcp_flow(
        folder,
        FLOW_V4["ino"],
        extra_bytes=b"",
        rcv_wnd=60000,
        rcv_wup=INQ_SEQ,
        timestamp=TIMESTAMP + 5000,
        backup_dir=tmp_path / "backup",
    )
    assert rewritten.timestamp == TIMESTAMP + 5000
    assert read_tcp_flows(folder) == [rewritten]


def test_to_snapshot_estimates_taken_at(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img", flows=[FLOW_V4])
    path = stream_path(folder)
    ten_seconds_ago = time.time() - 10
    os.utime(path, (ten_seconds_ago, ten_seconds_ago))
    snapshot = to_snapshot(read_tcp_flows(folder)[0])
    assert snapshot.taken_at == pytest.approx(time.monotonic() - 10, abs=1.0)


def test_mapped_address_key_is_ipv4(pycriu_images, tmp_path):
    mapped = {
        "ino": 9,
        "family": "INET6",
        "local": ("::ffff:198.18.2.2", 5001),
        "remote": ("::ffff:198.18.1.2", 40000),
    }
    folder = make_image_dir(pycriu_images, tmp_path / "img", flows=[mapped])
    flow = read_tcp_flows(folder)[0]
    assert flow.family == 6
    assert flow.local_addr == "::ffff:c612:202"
    assert str(flow.key) == "198.18.1.2:40000->198.18.2.2:5001"
    assert to_snapshot(flow).key.family == 4


# --- rewriting ----------------------------------------------------------------

EXTRA = b"hello-from-shield"


def rewrite(folder, flow, backup, extra=EXTRA, **changes):
    rcv_nxt = seq_add(flow.inq_seq, len(extra))
    edge = seq_add(flow.rcv_wup, flow.rcv_wnd)
    arguments = {
        "extra_bytes": extra,
        "rcv_wnd": (edge - rcv_nxt) & 0xFFFFFFFF,
        "rcv_wup": rcv_nxt,
        "timestamp": flow.timestamp + 5000,
        "backup_dir": backup,
    }
    arguments.update(changes)
    return rewrite_tcp_flow(folder, flow.inode, **arguments)


def test_rewrite_appends_to_receive_queue(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    before = read_tcp_flows(folder)[0]
    returned = rewrite(folder, before, tmp_path / "backup")
    after = read_tcp_flows(folder)[0]
    assert after == returned
    assert after.recv_queue == RECV + EXTRA
    assert after.send_queue == SEND
    assert after.inq_len == len(RECV) + len(EXTRA)
    assert after.inq_seq == seq_add(INQ_SEQ, len(EXTRA))
    assert after.rcv_wup == after.inq_seq
    assert seq_add(after.rcv_wup, after.rcv_wnd) == seq_add(
        before.rcv_wup, before.rcv_wnd
    )
    assert after.timestamp == TIMESTAMP + 5000
    assert after.outq_seq == before.outq_seq
    assert after.snd_wl1 == before.snd_wl1
    assert after.dumped_at == before.dumped_at


def test_rewrite_readable_by_pycriu(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    flow = read_tcp_flows(folder)[0]
    rewrite(folder, flow, tmp_path / "backup")
    with stream_path(folder).open("rb") as file:
        image = pycriu_images.load(file)
    assert image["magic"] == "TCP_STREAM"
    (entry,) = image["entries"]
    assert entry["inq_len"] == len(RECV) + len(EXTRA)
    assert base64.b64decode(entry["extra"]["inq"]) == RECV + EXTRA
    assert base64.b64decode(entry["extra"]["outq"]) == SEND


def test_rewrite_leaves_other_flows(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    other_before = stream_path(folder, FLOW_V6).read_bytes()
    rewrite(folder, read_tcp_flows(folder)[0], tmp_path / "backup")
    assert stream_path(folder, FLOW_V6).read_bytes() == other_before
    assert [p.name for p in (tmp_path / "backup").iterdir()] == [
        stream_image_name(FLOW_V4["ino"])
    ]


def test_rewrite_keeps_file_mode(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    stream_path(folder).chmod(0o600)
    rewrite(folder, read_tcp_flows(folder)[0], tmp_path / "backup")
    assert stat.S_IMODE(stream_path(folder).stat().st_mode) == 0o600
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize(
    "dumped, requested, written",
    [
        (TIMESTAMP + 1, TIMESTAMP + 1001, TIMESTAMP + 1001),
        (TIMESTAMP + 1, TIMESTAMP + 2000, TIMESTAMP + 2001),
        (TIMESTAMP, TIMESTAMP + 3001, TIMESTAMP + 3000),
    ],
)
def test_rewrite_keeps_timestamp_low_bit(
    pycriu_images, tmp_path, dumped, requested, written
):
    folder = make_image_dir(pycriu_images, tmp_path / "img", timestamp=dumped)
    flow = read_tcp_flows(folder)[0]
    after = rewrite(folder, flow, tmp_path / "backup", timestamp=requested)
    assert after.timestamp == written
    assert read_tcp_flows(folder)[0].timestamp == written


def test_rewrite_without_timestamps_ignores_clock(pycriu_images, tmp_path):
    folder = make_image_dir(
        pycriu_images,
        tmp_path / "img",
        opt_mask=images.TCPI_OPT_WSCALE,
        timestamp=None,
    )
    flow = read_tcp_flows(folder)[0]
    after = rewrite(folder, flow, tmp_path / "backup", timestamp=5)
    assert after.timestamp == 0
    with stream_path(folder).open("rb") as file:
        (entry,) = pycriu_images.load(file)["entries"]
    assert "timestamp" not in entry


def test_rewrite_none_timestamp_keeps_clock(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    flow = read_tcp_flows(folder)[0]
    after = rewrite(folder, flow, tmp_path / "backup", timestamp=None)
    assert after.timestamp == TIMESTAMP


def test_backup_written_once(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    original = stream_path(folder).read_bytes()
    backup = tmp_path / "backup"
    flow = rewrite(folder, read_tcp_flows(folder)[0], backup)
    rewrite(folder, flow, backup, extra=b"second")
    saved = backup / stream_image_name(FLOW_V4["ino"])
    assert saved.read_bytes() == original
    assert saved.stat().st_mtime_ns == MTIME_NS
    assert read_tcp_flows(folder)[0].recv_queue == RECV + EXTRA + b"second"


def test_restore_backup_round_trip(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    original = {path.name: path.read_bytes() for path in folder.iterdir()}
    flows_before = read_tcp_flows(folder)
    backup = tmp_path / "backup"
    for flow in flows_before:
        rewrite(folder, flow, backup)
    assert read_tcp_flows(folder) != flows_before
    restored = restore_backup(folder, backup)
    assert sorted(restored) == sorted(
        [stream_path(folder, FLOW_V4), stream_path(folder, FLOW_V6)]
    )
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == original
    assert read_tcp_flows(folder) == flows_before
    # The backups stay, so restoring again is harmless.
    assert len(restore_backup(folder, backup)) == 2


def test_restore_backup_without_backups(tmp_path):
    assert restore_backup(tmp_path, tmp_path / "missing") == []


def test_restore_backup_skips_temporary_files(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / ".tcp-stream-1a2b.img.x.tmp").write_bytes(b"partial")
    assert restore_backup(folder, backup) == []
    assert not (folder / ".tcp-stream-1a2b.img.x.tmp").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rcv_wup": seq_add(INQ_SEQ, len(EXTRA) + 1)}, "after the restored rcv_nxt"),
        ({"rcv_wnd": 0}, "before the dumped edge"),
        ({"timestamp": TIMESTAMP - 2}, "before the dumped clock"),
        ({"rcv_wnd": 2**32}, "invalid rcv_wnd"),
        ({"rcv_wup": -1}, "invalid rcv_wup"),
        ({"timestamp": 2**32}, "invalid timestamp"),
    ],
)
def test_rewrite_rejects_values(pycriu_images, tmp_path, changes, message):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    original = stream_path(folder).read_bytes()
    backup = tmp_path / "backup"
    with pytest.raises(ValueError, match=message) as caught:
        rewrite(folder, read_tcp_flows(folder)[0], backup, **changes)
    assert not isinstance(caught.value, ImageError)
    assert stream_path(folder).read_bytes() == original
    assert not backup.exists()


def test_rewrite_rejects_snd_wl1_beyond_window(pycriu_images, tmp_path):
    folder = make_image_dir(
        pycriu_images, tmp_path / "img", snd_wl1=seq_add(INQ_SEQ, 70000)
    )
    flow = read_tcp_flows(folder)[0]
    with pytest.raises(ValueError, match="snd_wl1"):
        rewrite(folder, flow, tmp_path / "backup")


def test_rewrite_unknown_inode(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    with pytest.raises(ImageError, match="no connected TCP socket with inode 5"):
        rewrite_tcp_flow(
            folder,
            5,
            extra_bytes=b"",
            rcv_wnd=0,
            rcv_wup=0,
            timestamp=None,
            backup_dir=tmp_path / "backup",
        )


# --- bad images ---------------------------------------------------------------


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])


def remove_files_image(folder):
    (folder / "files.img").unlink()
    return folder / "files.img", "file not found"


def remove_stream(folder):
    stream_path(folder).unlink()
    return stream_path(folder), "file not found"


def truncate_queue(folder):
    truncate(stream_path(folder), -3)
    return stream_path(folder), "truncated: the receive and send queues"


def truncate_payload(folder):
    truncate(stream_path(folder), 8 + 4 + 5)
    return stream_path(folder), "truncated: entry 0 needs"


def truncate_magic(folder):
    truncate(stream_path(folder), 6)
    return stream_path(folder), "truncated: 6 bytes"


def truncate_size(folder):
    truncate(folder / "files.img", -1)
    return folder / "files.img", "truncated"


def empty_stream(folder):
    stream_path(folder).write_bytes(b"")
    return stream_path(folder), "truncated: 0 bytes"


def garbage_files(folder):
    (folder / "files.img").write_bytes(random.Random(1).randbytes(300))
    return folder / "files.img", "not a FILES image"


def garbage_after_magic(folder):
    path = folder / "files.img"
    path.write_bytes(path.read_bytes()[:8] + b"\x10\x00\x00\x00" + b"\xff" * 16)
    return path, "entry 0 is corrupt"


def wrong_magic(folder):
    stream_path(folder).write_bytes((folder / "files.img").read_bytes())
    return stream_path(folder), "not a TCP_STREAM image, found a FILES image"


def trailing_bytes(folder):
    with stream_path(folder).open("ab") as file:
        file.write(b"xyz")
    return stream_path(folder), "3 unexpected bytes after the send queue"


def files_is_folder(folder):
    (folder / "files.img").unlink()
    (folder / "files.img").mkdir()
    return folder / "files.img", "is a folder"


CASES = {
    "missing files.img": remove_files_image,
    "missing tcp-stream": remove_stream,
    "truncated queue": truncate_queue,
    "truncated payload": truncate_payload,
    "truncated magic": truncate_magic,
    "truncated size": truncate_size,
    "empty tcp-stream": empty_stream,
    "garbage files.img": garbage_files,
    "garbage after magic": garbage_after_magic,
    "wrong magic": wrong_magic,
    "trailing bytes": trailing_bytes,
    "files.img is a folder": files_is_folder,
}


@pytest.mark.parametrize("damage", CASES.values(), ids=CASES.keys())
def test_bad_image_raises_image_error(pycriu_images, tmp_path, damage):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    path, problem = damage(folder)
    with pytest.raises(ImageError) as caught:
        read_tcp_flows(folder)
    message = str(caught.value)
    assert str(path) in message
    assert problem in message
    assert caught.value.path == path


def test_missing_stream_names_socket(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img")
    remove_stream(folder)
    with pytest.raises(ImageError, match="lists TCP socket inode 6699 .ESTABLISHED"):
        read_tcp_flows(folder)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ({"unsq_len": None}, "unsq_len is missing"),
        ({"unsq_len": len(SEND) + 1}, "exceeds outq_len"),
        ({"rcv_wscale": None}, "rcv_wscale missing"),
        ({"snd_wscale": 15}, "exceeds 14"),
        ({"timestamp": None}, "the timestamp is missing"),
        ({"rcv_wnd": None, "rcv_wup": None}, "rcv_wnd, rcv_wup are missing"),
    ],
)
def test_inconsistent_stream_raises(pycriu_images, tmp_path, overrides, problem):
    folder = make_image_dir(pycriu_images, tmp_path / "img", **overrides)
    with pytest.raises(ImageError, match=problem) as caught:
        read_tcp_flows(folder)
    assert caught.value.path == stream_path(folder)


def test_missing_required_field_raises(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img", recv=b"", send=b"")
    # pycriu's writer rejects such a message, so it is framed here.
    entry = pycriu_images.pb.tcp_stream_entry(
        inq_len=0, inq_seq=1, outq_len=0, outq_seq=2, opt_mask=0, snd_wscale=0
    )
    payload = entry.SerializePartialToString()
    magic = pycriu_images.magic.by_name
    header = struct.pack("=2I", magic["IMG_COMMON"], magic["TCP_STREAM"])
    stream_path(folder).write_bytes(header + struct.pack("=I", len(payload)) + payload)
    with pytest.raises(ImageError, match="required fields missing: mss_clamp"):
        read_tcp_flows(folder)


def test_every_truncation_raises_image_error(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img", flows=[FLOW_V4])
    path = stream_path(folder)
    data = path.read_bytes()
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(ImageError):
            read_tcp_flows(folder)


def test_corrupted_bytes_raise_only_image_error(pycriu_images, tmp_path):
    folder = make_image_dir(pycriu_images, tmp_path / "img", flows=[FLOW_V4])
    generator = random.Random(2024)
    originals = {
        path: path.read_bytes() for path in (folder / "files.img", stream_path(folder))
    }
    for _ in range(400):
        path, data = generator.choice(list(originals.items()))
        damaged = bytearray(data)
        for _ in range(generator.randint(1, 4)):
            damaged[generator.randrange(len(damaged))] = generator.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            read_tcp_flows(folder)
        except ImageError as exc:
            assert str(exc.path) in str(exc)
        path.write_bytes(data)


# --- finding the CRIU binary ------------------------------------------------------


def fake_criu(folder, version):
    script = folder / "criu"
    script.write_text(f"#!/bin/sh\necho 'Version: {version}'\n")
    script.chmod(0o755)
    return script


def test_find_criu_from_environment(tmp_path, monkeypatch):
    script = fake_criu(tmp_path, "4.2.1")
    monkeypatch.setenv(locate.CRIU_ENV, str(script))
    assert locate.find_criu() == script


def test_find_criu_rejects_old_environment(tmp_path, monkeypatch):
    script = fake_criu(tmp_path, "4.1")
    monkeypatch.setenv(locate.CRIU_ENV, str(script))
    with pytest.raises(locate.CriuNotFoundError, match="CRIU 4.1.0, older than 4.2"):
        locate.find_criu()


def test_find_criu_missing_environment_path(tmp_path, monkeypatch):
    monkeypatch.setenv(locate.CRIU_ENV, str(tmp_path / "nothing"))
    with pytest.raises(locate.CriuNotFoundError, match="SHIELDPROXY_CRIU"):
        locate.find_criu()


def test_find_criu_on_path(tmp_path, monkeypatch):
    script = fake_criu(tmp_path, "4.3")
    monkeypatch.delenv(locate.CRIU_ENV, raising=False)
    monkeypatch.setattr(locate, "PROJECT_CRIU", tmp_path / "absent" / "criu")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert str(locate.find_criu()) == str(script)


def test_find_criu_not_found(tmp_path, monkeypatch):
    fake_criu(tmp_path, "3.17.1")
    monkeypatch.delenv(locate.CRIU_ENV, raising=False)
    monkeypatch.setattr(locate, "PROJECT_CRIU", tmp_path / "absent" / "criu")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(locate.CriuNotFoundError) as caught:
        locate.find_criu()
    message = str(caught.value)
    assert "absent/criu does not exist" in message
    assert "CRIU 3.17.1, older than 4.2" in message
    assert "make setup" in message
