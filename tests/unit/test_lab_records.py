"""Lab records: owners, and which labs the next lab_up removes as stale."""

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict

import pytest

from shieldproxy.lab import topology
from shieldproxy.lab.records import (
    LabOwner,
    ProcessInfo,
    current_owner,
    owner_from_record,
    parse_proc_stat,
    read_process,
    stale_reason,
)

PID_NAMESPACE = 4026531836
OWNER = LabOwner(
    pid=1234, start_time=5000, pid_namespace=PID_NAMESPACE, lifetime="process"
)


def stat_line(comm, state="S", start_time=5000):
    # fields 4-21 as zeros, then field 22 (start time) and a few more
    middle = " ".join(["0"] * 18)
    return f"1234 ({comm}) {state} {middle} {start_time} 0 0 0\n"


def lookup(table):
    return lambda pid: table.get(pid)


def test_parse_proc_stat_plain():
    info = parse_proc_stat(stat_line("python3", "R", 98765))
    assert info == ProcessInfo(state="R", start_time=98765)


def test_parse_proc_stat_name_with_parens():
    info = parse_proc_stat(stat_line("a) Z 1 (b", "S", 42))
    assert info == ProcessInfo(state="S", start_time=42)


@pytest.mark.parametrize("text", ["", "1234 (x) S 1 2 3", "no parenthesis at all"])
def test_parse_proc_stat_rejects_short(text):
    with pytest.raises(ValueError, match="invalid /proc/<pid>/stat"):
        parse_proc_stat(text)


def test_read_process_matches_own_stat():
    info = read_process(os.getpid())
    assert info is not None
    assert info.state == "R"
    fields = open("/proc/self/stat").read().rpartition(")")[2].split()
    assert info.start_time == int(fields[19])


def test_read_process_missing_pid():
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    assert read_process(pid_max + 1) is None


def test_current_owner_round_trips():
    owner = current_owner("process")
    assert owner.pid == os.getpid()
    assert owner.pid_namespace == os.stat("/proc/self/ns/pid").st_ino
    assert owner_from_record({"owner": asdict(owner)}) == owner
    assert (
        stale_reason(owner, process_of=read_process, pid_namespace=owner.pid_namespace)
        is None
    )


def test_owner_from_record_persistent():
    record = {"owner": {**asdict(OWNER), "lifetime": "persistent"}}
    owner = owner_from_record(record)
    assert owner is not None
    assert owner.lifetime == "persistent"


@pytest.mark.parametrize(
    "record",
    [
        {"pid": 1234, "created": 1.0, "lab": {}},
        {"owner": None},
        {"owner": {**asdict(OWNER), "lifetime": "forever"}},
        {"owner": {**asdict(OWNER), "pid": "1234"}},
        {"owner": {**asdict(OWNER), "pid": True}},
        {"owner": {**asdict(OWNER), "pid": 0}},
        {"owner": {**asdict(OWNER), "start_time": -1}},
        {"owner": {key: value for key, value in asdict(OWNER).items() if key != "pid"}},
    ],
    ids=[
        "older-record",
        "null",
        "unknown-lifetime",
        "pid-text",
        "pid-bool",
        "pid-zero",
        "negative-start",
        "pid-missing",
    ],
)
def test_owner_from_record_invalid_is_none(record):
    assert owner_from_record(record) is None


@pytest.mark.parametrize(
    ("owner", "process", "expected"),
    [
        (None, None, None),
        (OWNER, ProcessInfo("S", 5000), None),
        (OWNER, None, "its owner process 1234 has exited"),
        (OWNER, ProcessInfo("Z", 5000), "has exited (state Z)"),
        (OWNER, ProcessInfo("S", 7000), "started at tick 7000, not 5000"),
        (LabOwner(1234, 5000, PID_NAMESPACE, "persistent"), None, None),
        (LabOwner(1234, 5000, PID_NAMESPACE + 1, "process"), None, None),
    ],
    ids=[
        "older-record-kept",
        "owner-alive-kept",
        "owner-gone",
        "owner-zombie",
        "pid-reused",
        "persistent-kept",
        "other-pid-namespace-kept",
    ],
)
def test_stale_reason(owner, process, expected):
    reason = stale_reason(
        owner, process_of=lookup({1234: process}), pid_namespace=PID_NAMESPACE
    )
    if expected is None:
        assert reason is None
    else:
        assert reason is not None
        assert expected in reason


def exited_owner():
    """Return the owner record of a process that ran and was waited for."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        info = read_process(child.pid)
        assert info is not None
    finally:
        child.kill()
        child.wait(timeout=5)
    return LabOwner(
        pid=child.pid,
        start_time=info.start_time,
        pid_namespace=os.stat("/proc/self/ns/pid").st_ino,
        lifetime="process",
    )


def test_killed_child_is_stale():
    owner = exited_owner()
    reason = stale_reason(
        owner, process_of=read_process, pid_namespace=owner.pid_namespace
    )
    assert reason is not None
    assert str(owner.pid) in reason


def test_zombie_child_is_stale():
    child = subprocess.Popen(["sleep", "30"])
    try:
        info = read_process(child.pid)
        assert info is not None
        owner = LabOwner(
            child.pid, info.start_time, os.stat("/proc/self/ns/pid").st_ino, "process"
        )
        os.kill(child.pid, signal.SIGKILL)
        # waits for the exit but leaves the child unreaped, as a zombie
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert read_process(child.pid) == ProcessInfo("Z", info.start_time)
        reason = stale_reason(
            owner, process_of=read_process, pid_namespace=owner.pid_namespace
        )
        assert reason is not None
        assert "state Z" in reason
    finally:
        child.kill()
        child.wait(timeout=5)


@pytest.fixture
def records(tmp_path, monkeypatch):
    """Point RECORD_DIR at TMP_PATH and record lab_down calls instead of running."""
    monkeypatch.setattr(topology, "RECORD_DIR", tmp_path)
    downed = []

    def fake_lab_down(lab_id):
        downed.append(lab_id)
        (tmp_path / f"{lab_id}.json").unlink()
        return [f"sp-{lab_id}-gw", str(tmp_path / f"{lab_id}.json")]

    monkeypatch.setattr(topology, "lab_down", fake_lab_down)
    monkeypatch.setattr(
        topology, "_kill_namespace_processes", lambda lab_id: ["killed pid 1 (x)"]
    )
    return tmp_path, downed


def write(folder, lab_id, owner):
    record = {"pid": 1, "created": 1.0, "lab": {"lab_id": lab_id}}
    if owner is not None:
        record["owner"] = asdict(owner)
    (folder / f"{lab_id}.json").write_text(json.dumps(record))


def test_reap_removes_only_dead_owners(records, caplog):
    folder, downed = records
    dead = exited_owner()
    alive = current_owner("process")
    write(folder, "aaaaa1", dead)
    write(folder, "aaaaa2", alive)
    persistent = LabOwner(dead.pid, dead.start_time, dead.pid_namespace, "persistent")
    write(folder, "aaaaa3", persistent)
    write(folder, "aaaaa4", None)
    (folder / "aaaaa5.json").write_text("{not json")
    write(folder, "not-an-id", dead)

    with caplog.at_level(logging.WARNING, logger="shieldproxy.lab.topology"):
        reaped = topology.reap_stale_labs()

    assert downed == ["aaaaa1"]
    assert reaped == {
        "aaaaa1": ["killed pid 1 (x)", "sp-aaaaa1-gw", str(folder / "aaaaa1.json")]
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "removed stale lab aaaaa1" in warnings[0]
    assert f"owner process {dead.pid} has exited" in warnings[0]
    assert "sp-aaaaa1-gw" in warnings[0]
    assert "killed pid 1 (x)" in warnings[0]
    for kept in ("aaaaa2", "aaaaa3", "aaaaa4", "aaaaa5", "not-an-id"):
        assert (folder / f"{kept}.json").exists()


def test_reap_failure_is_logged_and_skipped(records, monkeypatch, caplog):
    folder, _ = records
    write(folder, "bbbbb1", exited_owner())
    write(folder, "bbbbb2", exited_owner())

    def failing_down(lab_id):
        if lab_id == "bbbbb1":
            raise topology.LabError("simulated failure")
        return [lab_id]

    monkeypatch.setattr(topology, "lab_down", failing_down)
    with caplog.at_level(logging.WARNING, logger="shieldproxy.lab.topology"):
        reaped = topology.reap_stale_labs()

    assert list(reaped) == ["bbbbb2"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "removing stale lab bbbbb1 failed" in errors[0]
    assert "simulated failure" in errors[0]


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(30)
"""


def test_reap_skips_when_lock_held(records, monkeypatch, caplog):
    folder, downed = records
    write(folder, "ccccc1", exited_owner())
    monkeypatch.setattr(topology, "REAP_LOCK_TIMEOUT", 0.1)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(folder / ".reap.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with caplog.at_level(logging.WARNING, logger="shieldproxy.lab.topology"):
            reaped = topology.reap_stale_labs()
    finally:
        holder.kill()
        holder.wait(timeout=5)
    assert reaped == {}
    assert downed == []
    assert "skipped removing stale labs" in caplog.text
    assert list(topology.reap_stale_labs()) == ["ccccc1"]
    assert downed == ["ccccc1"]


def test_reap_without_record_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(topology, "RECORD_DIR", tmp_path / "missing")
    assert topology.reap_stale_labs() == {}
    assert not (tmp_path / "missing").exists()


def test_sigint_deferred_until_block_ends():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with topology._sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            steps.append("block finished")
        steps.append("after the block")
    assert steps == ["block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_deferred_restores_handler():
    with topology._sigint_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
