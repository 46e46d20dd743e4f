"""Real programs checkpointed by CRIU in a lab, and what their peers saw."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shieldproxy.criu.locate import find_criu
from shieldproxy.demo import read_counters
from shieldproxy.pcapcheck import first_new_data_at

PROCESS_TIMEOUT = 20.0
NETNS_KEY = "labnet"
"""Key that names the container's network namespace between dump and restore."""


def hook_path():
    """Return the hook executable installed beside the running Python."""
    return Path(sys.executable).parent / "shieldproxy-criu-hook"


class CriuTree:
    """A process tree started in the container namespace, for CRIU to dump.

    PLACEMENT "inside" runs CRIU in the container's network namespace, as a
    container engine running CRIU in the container does. "external" runs CRIU
    in the root namespace with the container's namespace marked external, so
    CRIU locks and unlocks the network itself (the network-lock and
    network-unlock stages) and the restore joins the same namespace again.
    """

    def __init__(self, created, workdir, argv, placement="inside"):
        self.created = created
        self.placement = placement
        self.workdir = workdir
        self.criu = str(find_criu())
        self.netns_path = f"/run/netns/{created.ctr_ns}"
        workdir.mkdir(parents=True, exist_ok=True)
        log = (workdir / "program.log").open("ab")
        # setsid, not `ip netns exec`: its private mount namespace breaks the
        # dump. The program gets no stray descriptors and no terminal.
        self.process = subprocess.Popen(
            ["nsenter", f"--net={self.netns_path}", "setsid", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
        )
        log.close()
        self.pid = self.process.pid

    def _criu(self, argv, images, hook_socket, pass_fds=()):
        command = [self.criu, *argv]
        if self.placement == "inside":
            command = ["nsenter", f"--net={self.netns_path}", *command]
        command += ["-D", str(images), "--tcp-established", "-v4"]
        env = dict(os.environ)
        if hook_socket is not None:
            command += ["--action-script", str(hook_path())]
            env["SHIELDPROXY_SOCKET"] = str(hook_socket)
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            pass_fds=pass_fds,
        )

    def dump(self, images, hook_socket=None):
        images.mkdir(parents=True, exist_ok=True)
        argv = ["dump", "-t", str(self.pid), "-o", "dump.log"]
        if self.placement == "external":
            inode = os.stat(self.netns_path).st_ino
            argv += ["--external", f"net[{inode}]:{NETNS_KEY}"]
        completed = self._criu(argv, images, hook_socket)
        if completed.returncode == 0:
            self.process.wait(timeout=PROCESS_TIMEOUT)
        return completed

    def restore(self, images, hook_socket=None):
        # CRIU restores the same PID, so the old process must be gone.
        _wait_gone(self.pid)
        pidfile = images / "restored.pid"
        argv = ["restore", "-d", "-o", "restore.log", "--pidfile", str(pidfile)]
        if self.placement == "external":
            descriptor = os.open(self.netns_path, os.O_RDONLY)
            try:
                argv += ["--inherit-fd", f"fd[{descriptor}]:{NETNS_KEY}"]
                completed = self._criu(argv, images, hook_socket, (descriptor,))
            finally:
                os.close(descriptor)
        else:
            completed = self._criu(argv, images, hook_socket)
        if completed.returncode == 0:
            self.pid = int(pidfile.read_text())
        return completed

    def alive(self):
        return _alive(self.pid)

    def wait_exit(self, timeout):
        """Wait until the (restored) program exits on its own."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid)


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pid):
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still exists")
        time.sleep(0.05)


class Capture:
    """tcpdump on the gateway's peer-side veth: every packet the peer sends.

    Immediate mode, because tcpdump otherwise gets packets in blocks and loses
    the last block's packets when it is stopped.
    """

    def __init__(self, created, path, port):
        self.path = path
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", created.gw_ns, "tcpdump", "-i",
             created.gw_peer_if, "-s", "128", "-U", "--immediate-mode",
             "-w", str(path), f"tcp port {port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        # tcpdump prints "listening on" once its socket is open
        self.process.stderr.readline()

    def stop(self):
        """Stop tcpdump and return its closing report (packets captured, dropped)."""
        exited_early = self.process.poll() is not None
        if not exited_early:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        report = self.process.stderr.read().decode(errors="replace")
        self.process.stderr.close()
        if exited_early:
            report = f"tcpdump exited early with {self.process.returncode}: {report}"
        return report


def resume_gap(pcap, receiver, restored_at):
    """Seconds from RESTORED_AT (epoch) to the first new byte sent to RECEIVER.

    The capture is the gateway's peer side, so this is when the peer sent a
    byte it never sent before.
    """
    sent_at = first_new_data_at(pcap, receiver, restored_at)
    return None if sent_at is None else sent_at - restored_at


def wait_listening(created, port, timeout=10.0):
    """Wait until a socket in the container namespace listens on PORT."""
    deadline = time.monotonic() + timeout
    while True:
        listing = created.run("ctr", ["ss", "-Htln", f"sport = :{port}"]).stdout
        if listing.strip():
            return
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.05)


def criu_failure(log_path, completed):
    """Describe a failed CRIU run: exit status, stderr and the log's errors."""
    log_text = log_path.read_text() if log_path.exists() else "(no log)"
    errors = [line for line in log_text.splitlines() if "Error" in line]
    return f"criu exited {completed.returncode}: {completed.stderr}\n" + "\n".join(
        errors[-15:]
    )


def peer_counters(created):
    return read_counters(created.peer_ns)


def counters_delta(before, after):
    return {name: after[name] - before[name] for name in before}


def load_json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
