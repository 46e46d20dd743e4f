"""Kill the shield daemon, the demo and a lab test at random points.

Afterwards nothing of theirs remains (no rule, queue binding, namespace, veth or
process), or the next start removes it and logs so: the restarted daemon for its
rules, the next lab_up for the labs of a killed process.

The kill points come from one seeded random.Random per test. The base seed is
printed in each test's output, and SHIELDPROXY_KILL_SEED=SEED runs the same
points again.
"""

import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shieldproxy.control import ControlError, call
from shieldproxy.kernel.rules import save
from shieldproxy.lab import topology
from shieldproxy.lab.topology import lab, lab_down

from .daemon_support import FROZEN_PORT, RunningDaemon, shield_chains

pytestmark = pytest.mark.lab

SEED = int(os.environ.get("SHIELDPROXY_KILL_SEED") or secrets.randbits(32))
REPO = Path(__file__).resolve().parents[2]
# Environment variable set in every subprocess these tests start. Children
# inherit it, so a scan of /proc/*/environ finds whatever a killed process left.
MARKER_VARIABLE = "SHIELDPROXY_KILL_TEST"
# Seconds a probe connection from the peer waits for a SYN-ACK or RST. A RST
# comes back within milliseconds, and a dropped SYN is resent only after 1 s.
PROBE_TIMEOUT = 0.5
# Seconds a killed or interrupted subprocess gets to exit.
EXIT_TIMEOUT = 30.0
# The daemon's kill points, each entered from an idle daemon.
DAEMON_POINTS = ("idle", "frozen", "thawing", "handed-over", "releasing")
# The small lab test that runs as a pytest subprocess. It creates two labs.
LAB_TEST = "tests/lab/test_topology.py::test_two_labs_do_not_collide"


@pytest.fixture
def rng(request):
    print(f"seed {SEED}: run again with SHIELDPROXY_KILL_SEED={SEED}")
    return random.Random(f"{SEED}:{request.node.name}")


@pytest.fixture(autouse=True)
def sigint_not_ignored():
    """Let the subprocesses handle SIGINT even if this process ignores it.

    A shell starts background jobs with SIGINT ignored, and children inherit
    that through exec, but a caught signal is reset to the default there, so
    Python in the child then raises KeyboardInterrupt on SIGINT again.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, previous)


# processes, namespaces and records


def netns_names():
    output = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def root_links():
    output = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in output.splitlines()]


def lab_leftovers(lab_id):
    """Return the namespaces, root links and record of LAB_ID that still exist."""
    names = [n for n in netns_names() if n.startswith(f"sp-{lab_id}-")]
    links = [n for n in root_links() if n.startswith(f"sp{lab_id}")]
    record = topology.RECORD_DIR / f"{lab_id}.json"
    return names + links + ([str(record)] if record.exists() else [])


def lab_records():
    """Return the readable lab records by lab id."""
    records = {}
    if not topology.RECORD_DIR.is_dir():
        return records
    for path in topology.RECORD_DIR.glob("*.json"):
        try:
            records[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return records


def processes_with(marker):
    """Return the pids of live processes whose environment contains MARKER."""
    needle = f"{MARKER_VARIABLE}={marker}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if needle in b"\0" + environment and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def wait_until_gone(marker, timeout):
    """Return the processes with MARKER still alive after up to TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_with(marker)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def describe(pids):
    names = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            command = b"?"
        text = command.replace(b"\0", b" ").decode(errors="replace")
        names.append(f"{pid}: {text[:120]}")
    return names


class KilledRun:
    """A subprocess started with a marker, and the labs it was seen to create.

    A lab is this run's when its record names the subprocess, or a process
    carrying the marker, as owner. Labs of other processes on this machine,
    which may be running lab tests at the same time, are never judged or
    touched.
    """

    def __init__(self, argv, tmp_path):
        self.marker = secrets.token_hex(8)
        self.output_path = tmp_path / f"output-{self.marker}.txt"
        self.output = self.output_path.open("w")
        self.records_before = set(lab_records())
        self.lab_ids = set()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env={**os.environ, MARKER_VARIABLE: self.marker},
        )

    def _owns(self, record):
        owner_pid = record.get("pid")
        if owner_pid == self.process.pid:
            return True
        return isinstance(owner_pid, int) and owner_pid in processes_with(self.marker)

    def poll_labs(self):
        for lab_id, record in lab_records().items():
            if lab_id in self.records_before or lab_id in self.lab_ids:
                continue
            if self._owns(record):
                self.lab_ids.add(lab_id)

    def wait_for(self, condition, timeout):
        """Poll the labs until CONDITION() is true, the process exits or time is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            self.poll_labs()
            if condition():
                return True
            time.sleep(0.01)
        self.poll_labs()
        return condition()

    def kill_at(self, signum, delay):
        """Send SIGNUM DELAY seconds from now, then wait for the process to exit.

        Returns:
            The seconds since start at which the signal was sent, or None if the
            process had already exited.
        """
        self.wait_for(lambda: False, delay)
        if self.process.poll() is not None:
            return None
        at = time.monotonic() - self.started
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"{self.process.args} did not exit {EXIT_TIMEOUT:.0f} s after "
                f"signal {signum}:\n{self.text()[-3000:]}"
            ) from None
        self.poll_labs()
        return at

    def text(self):
        self.output.flush()
        return self.output_path.read_text(errors="replace")

    def clean_up(self):
        """Kill what is left of the run and remove its labs, on every exit path."""
        try:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            kill_all(processes_with(self.marker))
            wait_until_gone(self.marker, 5)
            self.poll_labs()
            failures = []
            for lab_id in sorted(self.lab_ids):
                try:
                    if lab_leftovers(lab_id):
                        lab_down(lab_id)
                except topology.LabError as exc:
                    failures.append(str(exc))
            assert failures == [], f"removing the run's labs failed: {failures}"
        finally:
            self.output.close()


def reap_with_next_lab_up(run, caplog):
    """Create and remove a lab, and return the lab ids its lab_up named as removed.

    Only this run's labs that still exist just before are expected there. Another
    process's lab_up may remove one first, but then it is gone as well.
    """
    present = [lab_id for lab_id in sorted(run.lab_ids) if lab_leftovers(lab_id)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shieldproxy.lab.topology"):
        with lab():
            pass
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    named = [
        lab_id
        for lab_id in present
        if any(m.startswith(f"removed stale lab {lab_id} ") for m in warnings)
    ]
    return present, named, warnings


def kill_text(signum, at):
    when = "after the run exited" if at is None else f"at {at:.3f} s"
    return f"{signal.Signals(signum).name} {when}"


def check_killed_run(run, signum, at, caplog):
    """Check what is left after RUN got SIGNUM, and that the next lab_up removes it."""
    label = kill_text(signum, at)
    if signum == signal.SIGINT:
        # an interrupted run removes its own labs and stops its children
        left = wait_until_gone(run.marker, 10)
        assert left == [], f"{label}: processes left: {describe(left)}"
        for lab_id in sorted(run.lab_ids):
            assert lab_leftovers(lab_id) == [], f"{label}: lab {lab_id} left"
        return
    present, named, warnings = reap_with_next_lab_up(run, caplog)
    print(f"{label}: labs left by the killed run {present}, removed {named}")
    for message in warnings:
        print(f"lab_up logged: {message}")
    assert named == present, f"{label}: lab_up logged {warnings}"
    for lab_id in sorted(run.lab_ids):
        assert lab_leftovers(lab_id) == [], f"{label}: lab {lab_id} left"
    left = wait_until_gone(run.marker, 5)
    assert left == [], f"{label}: processes left: {describe(left)}"


# the shield daemon


def probe_frozen_port(created, family):
    """Connect from the peer to the frozen port over IPv4 or IPv6.

    Nothing listens there, so the container's kernel resets the connection
    unless the gateway drops the SYN.

    Returns:
        "reset" when the connection was refused, "dropped" when no SYN-ACK or
        RST came within PROBE_TIMEOUT, "connected" otherwise.
    """
    address = created.ctr_v4 if family == 4 else created.ctr_v6
    with created.enter("peer"):
        client = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6)
    with client:
        client.settimeout(PROBE_TIMEOUT)
        try:
            client.connect((address, FROZEN_PORT))
        except ConnectionRefusedError:
            return "reset"
        except TimeoutError:
            return "dropped"
    return "connected"


def probe_both(created):
    return {family: probe_frozen_port(created, family) for family in (4, 6)}


def chains_by_family(created):
    return {
        family: [
            line
            for line in save(created.gw_ns, family).splitlines()
            if line.startswith(":SP-")
        ]
        for family in (4, 6)
    }


def queue_bindings(created):
    path = "/proc/net/netfilter/nfnetlink_queue"
    return created.run("gw", ["cat", path]).stdout.strip()


def queue_rules(created):
    return [
        line
        for family in (4, 6)
        for line in save(created.gw_ns, family).splitlines()
        if "NFQUEUE" in line
    ]


def daemon_processes(daemon):
    """Return the pids whose command line names this daemon's config file."""
    needle = str(daemon.config).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def request_in_thread(daemon, request):
    """Send REQUEST from a thread, which stores the reply or the error in a dict."""
    outcome = {}

    def send():
        try:
            outcome["answer"] = call(daemon.socket, request, timeout_s=10)
        except (ControlError, OSError) as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, outcome


def kill_daemon_at(point, daemon, rng, out_dir):
    """Drive the idle daemon to POINT and SIGKILL it there.

    Returns:
        The random delay in seconds between reaching the point and the kill.
    """
    freeze = {"command": "freeze", "scope": "frozen", "dumps": []}
    thaw = {"command": "thaw", "scope": "frozen", "out_dir": str(out_dir)}
    release = {"command": "release", "scope": "frozen"}
    thread = None
    if point != "idle":
        call(daemon.socket, freeze)
    if point in ("handed-over", "releasing"):
        call(daemon.socket, thaw)
    if point == "thawing":
        thread, _ = request_in_thread(daemon, thaw)
        # a thaw without flows took 1-2 ms here
        delay = rng.uniform(0, 0.005)
    elif point == "releasing":
        thread, _ = request_in_thread(daemon, release)
        # a release runs iptables-restore per family, about 20 ms in all here
        delay = rng.uniform(0, 0.03)
    else:
        delay = rng.uniform(0, 0.3)
    time.sleep(delay)
    returncode = daemon.stop(signal.SIGKILL)
    assert returncode == -signal.SIGKILL, f"{point}: daemon exited {returncode}"
    if thread is not None:
        thread.join(timeout=10)
    return delay


def bring_to_idle(daemon):
    """Release the scope the restarted daemon resumed, if any."""
    state = call(daemon.socket, {"command": "status"})["scopes"]["frozen"]["state"]
    if state != "idle":
        call(daemon.socket, {"command": "release", "scope": "frozen", "force": True})
    return state


def test_daemon_killed_at_random_points(tmp_path, rng):
    points = list(DAEMON_POINTS)
    rng.shuffle(points)
    # about half the restarts find the scope's state directory, the others
    # find it lost
    restarts = (["keep-state", "lose-state"] * len(points))[: len(points)]
    rng.shuffle(restarts)
    scopes = [
        {"name": "frozen", "addresses": [], "ports": [FROZEN_PORT]},
    ]
    with lab() as created:
        scopes[0]["addresses"] = [created.ctr_v4, created.ctr_v6]
        daemon = RunningDaemon(created, tmp_path, scopes=scopes)
        try:
            assert probe_both(created) == {4: "reset", 6: "reset"}
            for index, point in enumerate(points):
                restart = restarts[index]
                delay = kill_daemon_at(point, daemon, rng, tmp_path / f"out-{index}")
                label = f"SIGKILL {point} after {delay:.4f} s, restart {restart}"
                print(label)

                # what the killed daemon left: its rules, and no process or binding
                left = chains_by_family(created)
                chains = left[4] + left[6]
                print(f"{label}: chains left {left}")
                assert daemon_processes(daemon) == [], label
                assert queue_bindings(created) == "", label
                if point in ("frozen", "thawing", "handed-over"):
                    assert chains == [":SP-d-frozen - [0:0]"] * 2, label
                    assert len(queue_rules(created)) == 2, label
                if point == "idle":
                    assert chains == [], label
                # peers of a family with rules see drops, never a reset
                expected = {f: "dropped" if left[f] else "reset" for f in (4, 6)}
                assert probe_both(created) == expected, label

                # the restarted daemon adopts or removes the rules, and logs it
                logged_before = daemon.log_path.stat().st_size
                if restart == "lose-state":
                    shutil.rmtree(tmp_path / "state", ignore_errors=True)
                daemon.start()
                state = bring_to_idle(daemon)
                print(f"{label}: the restarted daemon found the scope {state}")
                log_text = daemon.log_path.read_text()[logged_before:]
                if chains and restart == "lose-state":
                    assert "removed rules left by an earlier run" in log_text, label
                    for family in (4, 6):
                        named = f"ipv{family}:SP-d-frozen" in log_text
                        assert named == bool(left[family]), f"{label}: IPv{family}"
                if chains and restart == "keep-state":
                    assert "resumed" in log_text, label
                    assert state in ("frozen", "handed-over"), label
                    assert "released scope frozen" in log_text, label
                if not chains:
                    assert "removed rules left by an earlier run" not in log_text
                assert shield_chains(created) == [], label
                assert probe_both(created) == {4: "reset", 6: "reset"}, label

            # a clean stop leaves nothing of the daemon
            assert daemon.stop() == 0
            assert "shieldproxy daemon stopped" in daemon.log_path.read_text()
            assert chains_by_family(created) == {4: [], 6: []}
            assert queue_rules(created) == []
            assert queue_bindings(created) == ""
            assert daemon_processes(daemon) == []
            assert probe_both(created) == {4: "reset", 6: "reset"}
        finally:
            daemon.stop()
            subprocess.run(
                [sys.executable, "-m", "shieldproxy", "release", "--force",
                 "--config", str(daemon.config)],
                capture_output=True,
                timeout=30,
            )  # fmt: skip
            kill_all(daemon_processes(daemon))


# the demo and a lab test as subprocesses


DEMO_ARGV = [
    sys.executable, "-m", "shieldproxy", "demo",
    "--freeze", "1", "--no-baseline", "--rate", str(1024 * 1024),
]  # fmt: skip


SIGNALS = pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name
)


def kill_and_check(label, argv, tmp_path, rng, caplog, signum, *, kill_within):
    """Run ARGV, send SIGNUM at a random point, then check what it left.

    KILL_WITHIN maps a signal to the latest kill point in seconds. A SIGKILL
    point counts from the first lab record of the run, so the kill leaves a
    lab for the next lab_up to remove. A SIGINT point counts from the start.
    """
    run = KilledRun(argv, tmp_path)
    try:
        if signum == signal.SIGKILL:
            assert run.wait_for(lambda: run.lab_ids, 30), run.text()[-3000:]
        at = run.kill_at(signum, rng.uniform(0, kill_within[signum]))
        print(
            f"{label}: {kill_text(signum, at)}, exit status "
            f"{run.process.returncode}, labs {sorted(run.lab_ids)}"
        )
        if at is None:
            print(f"the {label} finished before the kill point")
        check_killed_run(run, signum, at, caplog)
    finally:
        run.clean_up()


@SIGNALS
def test_demo_killed_at_random_point(tmp_path, rng, caplog, signum):
    # With these options the demo took 7.3-7.8 s on a 2-core machine: its lab
    # exists from 0.25 s on, then come 2 s of warm-up, the 1 s freeze, the
    # restore and the checks.
    kill_within = {signal.SIGKILL: 7.0, signal.SIGINT: 7.5}
    kill_and_check(
        "demo", DEMO_ARGV, tmp_path, rng, caplog, signum, kill_within=kill_within
    )


@SIGNALS
def test_lab_test_killed_at_random_point(tmp_path, rng, caplog, signum):
    # The pytest subprocess took about 1 s on a 2-core machine, and its two labs
    # existed from about 0.2 s to 0.35-0.45 s. A SIGKILL within 0.12 s of the
    # first lab record lands while it or the second lab is built or used.
    argv = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "--basetemp", str(tmp_path / "inner"), LAB_TEST,
    ]  # fmt: skip
    kill_within = {signal.SIGKILL: 0.12, signal.SIGINT: 1.0}
    kill_and_check(
        "lab test", argv, tmp_path, rng, caplog, signum, kill_within=kill_within
    )


# which labs the next lab_up removes

OWNER_SCRIPT = """
import time
from shieldproxy.lab.topology import lab
with lab() as created:
    created.popen("peer", ["sleep", "60"])
    print(created.lab_id, flush=True)
    time.sleep(60)
"""


def start_owner(tmp_path):
    """Start a process that creates a lab, runs sleep in it and waits."""
    run = KilledRun([sys.executable, "-c", OWNER_SCRIPT], tmp_path)
    # its sleep process carries the marker too, once the lab exists
    ready = run.wait_for(
        lambda: run.lab_ids and len(processes_with(run.marker)) >= 2, 30
    )
    assert ready, run.text()[-3000:]
    return run


def test_lab_reaped_only_after_owner_dies(tmp_path, caplog):
    run = start_owner(tmp_path)
    try:
        (lab_id,) = run.lab_ids
        present, named, warnings = reap_with_next_lab_up(run, caplog)
        assert present == [lab_id]
        assert named == [], warnings
        assert len(lab_leftovers(lab_id)) == 4

        sleeper = [pid for pid in processes_with(run.marker) if pid != run.process.pid]
        at = run.kill_at(signal.SIGKILL, 0)
        check_killed_run(run, signal.SIGKILL, at, caplog)
        reaped = [m for m in caplog.messages if f"stale lab {lab_id} " in m]
        assert len(reaped) == 1
        assert f"owner process {run.process.pid} has exited" in reaped[0]
        assert f"killed pid {sleeper[0]} (sleep)" in reaped[0]
        assert f"sp-{lab_id}-peer" in reaped[0]
    finally:
        run.clean_up()


def test_persistent_lab_outlives_cli(tmp_path, caplog):
    argv = [sys.executable, "-m", "shieldproxy", "lab", "up"]
    run = KilledRun(argv, tmp_path)
    lab_ids = []
    try:
        assert run.process.wait(timeout=EXIT_TIMEOUT) == 0, run.text()
        run.poll_labs()
        lab_ids = sorted(run.lab_ids)
        assert len(lab_ids) == 1, run.text()
        record = lab_records()[lab_ids[0]]
        assert record["owner"]["lifetime"] == "persistent"
        assert record["owner"]["pid"] == run.process.pid

        present, named, warnings = reap_with_next_lab_up(run, caplog)
        assert present == lab_ids
        assert named == [], warnings
        assert len(lab_leftovers(lab_ids[0])) == 4
    finally:
        run.clean_up()
    for lab_id in lab_ids:
        assert lab_leftovers(lab_id) == []


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    return child.pid


def test_record_without_owner_kept(caplog):
    created = topology.lab_up()
    try:
        path = topology.RECORD_DIR / f"{created.lab_id}.json"
        record = json.loads(path.read_text())
        # as older code wrote it, by a process that has exited
        del record["owner"]
        record["pid"] = dead_pid()
        path.write_text(json.dumps(record))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shieldproxy.lab.topology"):
            with lab():
                pass
        assert f"stale lab {created.lab_id}" not in caplog.text
        assert len(lab_leftovers(created.lab_id)) == 4
    finally:
        lab_down(created.lab_id)


def test_reused_pid_lab_reaped(caplog):
    created = topology.lab_up()
    try:
        path = topology.RECORD_DIR / f"{created.lab_id}.json"
        record = json.loads(path.read_text())
        # the owner pid is this live process, but with another start time
        record["owner"]["start_time"] -= 1
        path.write_text(json.dumps(record))
        present = bool(lab_leftovers(created.lab_id))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shieldproxy.lab.topology"):
            with lab():
                pass
        # another process's lab_up may have removed it first
        if present:
            assert f"removed stale lab {created.lab_id} " in caplog.text
            assert "that pid now belongs to a process started" in caplog.text
        assert lab_leftovers(created.lab_id) == []
    finally:
        if lab_leftovers(created.lab_id):
            lab_down(created.lab_id)
