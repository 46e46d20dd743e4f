"""Child processes that report JSON lines on stdout, driven from trio."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)


class ChildError(RuntimeError):
    """A child process exited or timed out before reporting what was expected."""


class Child:
    """A running program whose stdout is a stream of JSON event lines.

    Lines that are not JSON objects are kept as ``{"event": "text", "line": ...}``
    so nothing a child prints is lost.
    """

    def __init__(self, name: str, process: trio.Process, stderr_path: Path) -> None:
        self.name = name
        self.process = process
        self.stderr_path = stderr_path
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self._closed = False

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        stdin: bool = False,
        env: dict[str, str] | None = None,
    ) -> Child:
        stderr_path = log_dir / f"{name}.stderr"
        with stderr_path.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )
        return cls(name, process, stderr_path)

    async def read_events(self) -> None:
        """Collect events until the child closes stdout; run this in a nursery."""
        assert self.process.stdout is not None
        buffer = b""
        try:
            while True:
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._add(line)
        finally:
            if buffer:
                self._add(buffer)
            self._closed = True
            self._changed.set()

    def _add(self, line: bytes) -> None:
        text = line.decode(errors="replace").strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            event = {"event": "text", "line": text}
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def last(self, name: str) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if event.get("event") == name:
                found: dict[str, Any] = event
                return found
        return None

    async def wait_for(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for the first event called ``name``; raise ChildError if none comes."""
        with trio.move_on_after(timeout):
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        return event
                if self._closed:
                    break
                await self._changed.wait()
        raise ChildError(
            f"{self.name} did not report {name!r} within {timeout:.0f} s "
            f"(exit status {self.process.returncode}); its stderr is in "
            f"{self.stderr_path}: {self.stderr_tail()}"
        )

    async def send_line(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    def stderr_tail(self, limit: int = 400) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:].strip()

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate the child's process group, escalating to SIGKILL."""
        if self.process.returncode is None:
            self._signal_group(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await self.process.wait()
        if self.process.returncode is None:
            self._signal_group(signal.SIGKILL)
            with trio.move_on_after(timeout):
                await self.process.wait()
        return self.process.returncode

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            self.signal(signum)
