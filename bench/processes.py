"""Background processes of the benchmarks: the shield daemon and iperf3."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from shieldproxy.control import ControlError, call
from shieldproxy.kernel.netns import netns_command, run_in_netns
from shieldproxy.lab.topology import Lab

DAEMON_START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


async def stop_process(process: trio.Process, signum: int = signal.SIGTERM) -> None:
    """Signal PROCESS and wait for it, escalating to SIGKILL after a timeout."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                pass
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()


def daemon_config(
    created: Lab,
    folder: Path,
    scopes: Sequence[tuple[str, int]],
    queue: int,
) -> Path:
    """Write a gateway config with one scope per (name, container port)."""
    config = {
        "mode": "gateway",
        "netns": created.gw_ns,
        "scopes": [
            {"name": name, "addresses": [created.ctr_v4], "ports": [port]}
            for name, port in scopes
        ],
        "queues": {"first": queue, "last": queue},
        "control": {"socket_path": str(folder / "control.sock")},
        "state_dir": str(folder / "state"),
        "logging": {"level": "WARNING"},
    }
    path = folder / "shield.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
    return path


class Daemon:
    """A ``shieldproxy run`` process and calls to its control socket."""

    def __init__(self, process: trio.Process, socket_path: Path) -> None:
        self.process = process
        self.socket_path = socket_path

    async def call(self, **request: Any) -> Any:
        return await trio.to_thread.run_sync(call, self.socket_path, request)


@asynccontextmanager
async def running_daemon(config_path: Path, log_path: Path) -> AsyncIterator[Daemon]:
    """Run the daemon for the block; stop it with SIGTERM on every exit path."""
    socket_path = config_path.parent / "control.sock"
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "shieldproxy", "run", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        daemon = Daemon(process, socket_path)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while True:
            try:
                await daemon.call(command="status")
                break
            except ControlError:
                if process.returncode is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-1000:]
                    raise RuntimeError(
                        f"the shield daemon did not start within "
                        f"{DAEMON_START_TIMEOUT_S:.0f} s: {tail}"
                    ) from None
                await trio.sleep(0.1)
        yield daemon
    finally:
        await stop_process(process)


async def wait_listening(netns: str, port: int, timeout_s: float = 10.0) -> None:
    """Wait until a TCP socket listens on PORT in NETNS."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await trio.to_thread.run_sync(
            run_in_netns, netns, ["ss", "-ltnH", f"( sport = :{port} )"]
        )
        if result.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out after {timeout_s:.0f} s waiting for a listener on port "
                f"{port} in {netns}"
            )
        await trio.sleep(0.05)


async def iperf3(
    created: Lab, port: int, seconds: int, log_path: Path
) -> dict[str, float]:
    """Run one iperf3 test from peer to container; return Gbit/s and CPU use.

    Raises:
        RuntimeError: iperf3 failed or its report is not as expected.
    """
    with log_path.open("ab") as log:
        server = await trio.lowlevel.open_process(
            netns_command(
                created.ctr_ns,
                ["iperf3", "-s", "-1", "-B", created.ctr_v4, "-p", str(port)],
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_listening(created.ctr_ns, port)
        argv = ["iperf3", "-c", created.ctr_v4, "-p", str(port), "-t", str(seconds)]
        if seconds >= 4:
            argv += ["-O", "1"]  # leave slow start out of the average
        completed = None
        with trio.move_on_after(seconds + 30):
            completed = await trio.run_process(
                netns_command(created.peer_ns, [*argv, "-J"]),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if completed is None:
            raise RuntimeError(f"iperf3 did not finish within {seconds + 30} s")
        try:
            document = json.loads(completed.stdout)
            end = document["end"]
            bits = float(end["sum_received"]["bits_per_second"])
            cpu = end["cpu_utilization_percent"]
        except (ValueError, KeyError, TypeError) as exc:
            text = (completed.stdout + completed.stderr).decode(errors="replace")
            raise RuntimeError(
                f"iperf3 exited {completed.returncode} without a report "
                f"({exc}): {text[-500:]}"
            ) from None
        return {
            "gbit_per_s": bits / 1e9,
            "sender_cpu_percent": float(cpu["host_total"]),
            "receiver_cpu_percent": float(cpu["remote_total"]),
        }
    finally:
        await stop_process(server)
