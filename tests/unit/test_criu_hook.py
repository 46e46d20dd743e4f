"""The CRIU action script's stages, against a recorded daemon and real images."""

import json
import sys
import time
from pathlib import Path

import pytest

from shieldproxy.control import ControlError
from shieldproxy.criu import hook
from shieldproxy.criu.hook import HookContext, HookError, run_stage
from shieldproxy.criu.images import read_tcp_flows
from shieldproxy.handover import save_handover
from shieldproxy.tcp.flow import FlowHandover
from shieldproxy.tcp.seq import seq_add, seq_diff, seq_ge
from shieldproxy.tcp.snapshot import FlowKey

from .test_criu_images import FLOW_V4, INQ_SEQ, RECV, TIMESTAMP, make_image_dir

pytestmark = pytest.mark.filterwarnings(
    "ignore:label\\(\\) is deprecated:DeprecationWarning"
)

ABSORBED = b"bytes the shield acknowledged during the freeze"
SCOPES = {
    "app": {"addresses": ["198.18.2.0/24"], "ports": [5001], "state": "idle"},
    "other": {"addresses": ["198.18.4.2"], "ports": [], "state": "idle"},
}


@pytest.fixture
def pycriu_images():
    return pytest.importorskip("pycriu.images")


class RecordedDaemon:
    """Stands in for the daemon's control socket and records each request."""

    def __init__(self, monkeypatch):
        self.requests = []
        self.thaws = 0
        monkeypatch.setattr(hook, "call", self.call)

    def call(self, path, request):
        self.requests.append(request)
        command = request["command"]
        if command == "status":
            return {"mode": "gateway", "scopes": SCOPES}
        if command == "freeze":
            return {"scope": request["scope"], "flows": 1, "ignored": []}
        if command == "thaw":
            self.thaws += 1
            return {
                "scope": request["scope"],
                "handovers": [self.write_handover(request)],
            }
        if command == "announce":
            return {"scope": request["scope"], "announced": list(request["restored"])}
        if command == "release":
            return {"released": [request["scope"]]}
        raise AssertionError(command)

    def write_handover(self, request):
        handover = FlowHandover(
            key=FlowKey.create(*FLOW_V4["local"], *FLOW_V4["remote"]),
            start_seq=INQ_SEQ,
            data=ABSORBED,
            rcv_nxt=seq_add(INQ_SEQ, len(ABSORBED)),
            fin=False,
            reset=False,
            right_edge=seq_add(INQ_SEQ, 70000),
            tsval=TIMESTAMP + 30000,
            ts_recent=None,
            discarded_bytes=0,
        )
        return str(save_handover(handover, Path(request["out_dir"]), time.monotonic()))

    def commands(self):
        return [request["command"] for request in self.requests]


def context(stage, image_dir=None, scope=None, init_pid=None):
    return HookContext(
        stage=stage,
        socket_path=hook.DEFAULT_SOCKET,
        image_dir=image_dir,
        init_pid=init_pid,
        scope=scope,
    )


# --- environment ------------------------------------------------------------


def test_context_requires_stage():
    with pytest.raises(HookError, match="CRTOOLS_SCRIPT_ACTION is not set"):
        hook.context_from_environment({}, None, None)


def test_context_from_criu_variables(tmp_path):
    environ = {
        "CRTOOLS_SCRIPT_ACTION": "post-dump",
        "CRTOOLS_IMAGE_DIR": str(tmp_path),
        "CRTOOLS_INIT_PID": "4321",
        "SHIELDPROXY_SOCKET": "/run/test/control.sock",
        "SHIELDPROXY_SCOPE": "app",
    }
    built = hook.context_from_environment(environ, None, None)
    assert built.stage == "post-dump"
    assert built.image_dir == tmp_path.resolve()
    assert built.init_pid == 4321
    assert str(built.socket_path) == "/run/test/control.sock"
    assert built.scope == "app"


def test_context_options_override_environment():
    environ = {"CRTOOLS_SCRIPT_ACTION": "pre-dump", "SHIELDPROXY_SCOPE": "app"}
    built = hook.context_from_environment(environ, "other", None)
    assert built.scope == "other"
    assert built.socket_path == hook.DEFAULT_SOCKET
    assert built.init_pid is None


@pytest.mark.parametrize(
    ("text", "version", "expected"),
    [
        ("020212C6", 4, "198.18.2.2"),
        ("00000000", 4, "0.0.0.0"),
        ("0000000000000000FFFF0000020212C6", 6, "198.18.2.2"),
        ("02000120020000000000000002000000", 6, "2001:2:0:2::2"),
    ],
)
def test_proc_address_decoding(text, version, expected):
    if sys.byteorder != "little":
        pytest.skip("the table holds /proc/net/tcp text of a little-endian host")
    assert hook._proc_address(text, version) == expected


def test_covering_scopes_by_address_and_port():
    endpoints = {("198.18.2.2", 5001), ("0.0.0.0", 22)}
    assert hook._covering_scopes(SCOPES, endpoints) == ["app"]
    assert hook._covering_scopes(SCOPES, {("198.18.2.2", 5002)}) == []
    # a scope without ports covers every port of its addresses
    assert hook._covering_scopes(SCOPES, {("198.18.4.2", 9)}) == ["other"]


# --- stages -----------------------------------------------------------------


def test_stage_without_work_succeeds():
    assert run_stage(context("setup-namespaces")) == "nothing to do at this stage"


def test_no_daemon_fails_first_stage(tmp_path):
    missing = HookContext(
        stage="pre-dump",
        socket_path=tmp_path / "absent.sock",
        image_dir=tmp_path,
        init_pid=None,
        scope="app",
    )
    with pytest.raises(HookError) as caught:
        run_stage(missing)
    message = str(caught.value)
    assert str(tmp_path / "absent.sock") in message
    assert "shieldproxy run --config FILE" in message


def test_pre_dump_named_scope_freezes_it(monkeypatch, tmp_path):
    daemon = RecordedDaemon(monkeypatch)
    summary = run_stage(context("pre-dump", tmp_path, scope="app"))
    assert summary == "froze scopes app"
    assert daemon.requests[-1] == {"command": "freeze", "scope": "app"}
    scopes = json.loads((tmp_path / "shieldproxy" / "scopes.json").read_text())
    assert scopes == {"scopes": ["app"]}


def test_pre_dump_unknown_scope_fails(monkeypatch, tmp_path):
    RecordedDaemon(monkeypatch)
    with pytest.raises(HookError, match="scope 'web' not found; the shield has app"):
        run_stage(context("pre-dump", tmp_path, scope="web"))


def test_post_dump_sends_image_snapshots(monkeypatch, pycriu_images, tmp_path):
    image_dir = make_image_dir(pycriu_images, tmp_path / "images", flows=[FLOW_V4])
    daemon = RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", image_dir, scope="app"))
    summary = run_stage(context("post-dump", image_dir))
    assert summary == "shielding 1 of the 1 TCP flows in the images"
    request = daemon.requests[-1]
    assert request["command"] == "freeze"
    (snapshot,) = request["snapshots"]
    assert snapshot["key"]["container_addr"] == "198.18.2.2"
    assert snapshot["rcv_nxt"] == INQ_SEQ


def test_post_dump_failure_releases(monkeypatch, tmp_path):
    daemon = RecordedDaemon(monkeypatch)
    image_dir = tmp_path / "images"
    run_stage(context("pre-dump", image_dir, scope="app"))
    # no files.img: the images are unreadable, so CRIU will resume the tree
    with pytest.raises(HookError) as caught:
        run_stage(context("post-dump", image_dir))
    assert "files.img" in str(caught.value)
    assert "released scopes ['app']" in str(caught.value)
    assert daemon.requests[-1] == {"command": "release", "scope": "app", "force": True}


def restore_stages(image_dir):
    summaries = []
    for stage in ("pre-restore", "post-restore", "pre-resume", "post-resume"):
        summaries.append(run_stage(context(stage, image_dir)))
    return summaries


def test_restore_writes_absorbed_bytes(monkeypatch, pycriu_images, tmp_path):
    image_dir = make_image_dir(pycriu_images, tmp_path / "images", flows=[FLOW_V4])
    daemon = RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", image_dir, scope="app"))
    summaries = restore_stages(image_dir)
    assert summaries[0].startswith(f"wrote {len(ABSORBED)} absorbed bytes of 1 flows")
    assert summaries[1] == "announced 1 restored windows"
    assert summaries[2] == "released scopes app"
    assert summaries[3] == "nothing left to release"
    assert daemon.commands()[-3:] == ["thaw", "announce", "release"]

    (flow,) = read_tcp_flows(image_dir)
    assert flow.recv_queue == RECV + ABSORBED
    assert flow.inq_seq == seq_add(INQ_SEQ, len(ABSORBED))
    assert flow.rcv_wup == flow.inq_seq
    right_edge = seq_add(flow.rcv_wup, flow.rcv_wnd)
    assert seq_ge(right_edge, seq_add(INQ_SEQ, 70000))
    assert seq_diff(flow.timestamp, TIMESTAMP + 30000) >= hook.RESTORE_TSVAL_MARGIN_MS
    restored = json.loads((image_dir / "shieldproxy" / "restored.json").read_text())
    assert restored == {
        str(flow.key): {"rcv_nxt": flow.inq_seq, "right_edge": right_edge}
    }
    backup = image_dir / "shieldproxy" / "backup" / flow.stream_image.name
    assert backup.exists()


class ReleasedDaemon(RecordedDaemon):
    """A daemon whose scope the operator released after a failed restore."""

    def __init__(self, monkeypatch, state):
        super().__init__(monkeypatch)
        self.state = state

    def call(self, path, request):
        if request["command"] == "announce":
            self.requests.append(request)
            raise ControlError(f"scope 'app' is {self.state}, not handed over")
        if request["command"] == "status":
            self.requests.append(request)
            scopes = {**SCOPES, "app": {**SCOPES["app"], "state": self.state}}
            return {"mode": "sidecar", "scopes": scopes}
        return super().call(path, request)


def test_post_restore_skips_released_scope(monkeypatch, pycriu_images, tmp_path):
    image_dir = make_image_dir(pycriu_images, tmp_path / "images", flows=[FLOW_V4])
    RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", image_dir, scope="app"))
    run_stage(context("pre-restore", image_dir))
    daemon = ReleasedDaemon(monkeypatch, "idle")
    summary = run_stage(context("post-restore", image_dir))
    assert summary == (
        "announced 0 restored windows. Scopes released before this restore, "
        "with nothing to announce: app"
    )
    assert daemon.commands() == ["announce", "status"]


def test_post_restore_announce_error_raised(monkeypatch, pycriu_images, tmp_path):
    image_dir = make_image_dir(pycriu_images, tmp_path / "images", flows=[FLOW_V4])
    RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", image_dir, scope="app"))
    run_stage(context("pre-restore", image_dir))
    ReleasedDaemon(monkeypatch, "frozen")
    with pytest.raises(HookError, match="'app' is frozen, not handed over"):
        run_stage(context("post-restore", image_dir))


def test_second_restore_attempt_same_images(monkeypatch, pycriu_images, tmp_path):
    image_dir = make_image_dir(pycriu_images, tmp_path / "images", flows=[FLOW_V4])
    daemon = RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", image_dir, scope="app"))
    run_stage(context("pre-restore", image_dir))
    first = read_tcp_flows(image_dir)[0]
    # CRIU failed after pre-restore; the operator runs the restore again
    run_stage(context("pre-restore", image_dir))
    second = read_tcp_flows(image_dir)[0]
    # the daemon is asked again, and the rewrite starts from the backups
    assert daemon.thaws == 2
    assert second.recv_queue == RECV + ABSORBED
    assert second.inq_seq == first.inq_seq
    assert second.rcv_wnd == first.rcv_wnd


def test_restore_failure_keeps_images(monkeypatch, pycriu_images, tmp_path):
    image_dir = make_image_dir(pycriu_images, tmp_path / "images", flows=[FLOW_V4])
    daemon = RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", image_dir, scope="app"))
    original = read_tcp_flows(image_dir)[0]
    # the tcp-stream image got truncated after the dump
    data = original.stream_image.read_bytes()
    original.stream_image.write_bytes(data[:-3])
    with pytest.raises(HookError) as caught:
        run_stage(context("pre-restore", image_dir))
    message = str(caught.value)
    assert original.stream_image.name in message
    assert "the restore can be tried again" in message
    assert "release" not in daemon.commands()
    # the hand-over files stay beside the images for the next attempt
    handover_dir = image_dir / "shieldproxy" / "handover-app"
    assert (handover_dir / "complete.json").exists()


def test_post_restore_without_pre_restore(monkeypatch, tmp_path):
    RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", tmp_path, scope="app"))
    with pytest.raises(HookError, match="pre-restore stage did not run or failed"):
        run_stage(context("post-restore", tmp_path))


def test_handover_not_in_images_fails(monkeypatch, pycriu_images, tmp_path):
    # the shield handed over a flow that these images do not have
    other_dir = make_image_dir(pycriu_images, tmp_path / "other", flows=[])
    RecordedDaemon(monkeypatch)
    run_stage(context("pre-dump", other_dir, scope="app"))
    with pytest.raises(HookError, match="have no TCP flow"):
        run_stage(context("pre-restore", other_dir))
