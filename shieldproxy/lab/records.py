"""Owners of lab records, and when a lab whose owner is gone counts as stale.

A lab record names the process that created the lab, with its start time and
PID namespace, and the lab's lifetime. These functions read that part of a
record and decide from ``/proc`` whether the owner still runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Lifetime = Literal["process", "persistent"]


@dataclass(frozen=True)
class LabOwner:
    """The process that created a lab, and how long the lab is meant to live.

    Attributes:
        pid: process id in the PID namespace given by ``pid_namespace``.
        start_time: the process's start time, field 22 of ``/proc/<pid>/stat``
            (clock ticks after boot). A pid that is reused later has another
            start time.
        pid_namespace: inode of the process's ``/proc/<pid>/ns/pid``.
        lifetime: ``process`` if the lab is removed once the process has
            exited, ``persistent`` if it stays until ``lab_down``.
    """

    pid: int
    start_time: int
    pid_namespace: int
    lifetime: Lifetime


@dataclass(frozen=True)
class ProcessInfo:
    """State letter and start time of a process, from ``/proc/<pid>/stat``."""

    state: str
    start_time: int


def parse_proc_stat(text: str) -> ProcessInfo:
    """Parse the state (field 3) and start time (field 22) of a ``/proc/<pid>/stat``.

    Field 2, the command name in parentheses, may contain spaces and
    parentheses itself, so the fields are counted from its last ``)``.

    Raises:
        ValueError: TEXT is not in the format of proc(5).
    """
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        raise ValueError(f"invalid /proc/<pid>/stat line: {text[:200]!r}")
    # fields[0] is field 3 of proc(5), so field N is fields[N - 3]
    return ProcessInfo(state=fields[0], start_time=int(fields[19]))


def read_process(pid: int) -> ProcessInfo | None:
    """Return the state and start time of process PID, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse_proc_stat(text)


def own_pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def current_owner(lifetime: Lifetime) -> LabOwner:
    """Describe the calling process as the owner of a lab with LIFETIME."""
    pid = os.getpid()
    info = read_process(pid)
    if info is None:
        raise FileNotFoundError(f"/proc/{pid}/stat of the calling process not found")
    return LabOwner(
        pid=pid,
        start_time=info.start_time,
        pid_namespace=own_pid_namespace(),
        lifetime=lifetime,
    )


def owner_from_record(record: Mapping[str, Any]) -> LabOwner | None:
    """Return the owner stored in a lab record, or None if it has no valid one.

    Records written before owners were recorded have no ``owner`` field, so
    nothing is known about their lifetime, and None keeps them from removal.
    """
    owner = record.get("owner")
    if not isinstance(owner, Mapping):
        return None
    lifetime = owner.get("lifetime")
    if lifetime != "process" and lifetime != "persistent":
        return None
    values = [owner.get(key) for key in ("pid", "start_time", "pid_namespace")]
    # bool is a subclass of int, and True is no pid
    numbers = [
        v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0
    ]
    if len(numbers) != len(values) or numbers[0] == 0:
        return None
    pid, start_time, pid_namespace = numbers
    return LabOwner(
        pid=pid, start_time=start_time, pid_namespace=pid_namespace, lifetime=lifetime
    )


def stale_reason(
    owner: LabOwner | None,
    *,
    process_of: Callable[[int], ProcessInfo | None],
    pid_namespace: int,
) -> str | None:
    """Return why the lab of OWNER is stale, or None if it must stay.

    A lab is stale when it belongs to a process (lifetime ``process``) and that
    process has exited: no process has its pid, the process is a zombie, or the
    pid belongs to a process with another start time. A lab stays when its
    record has no owner, when it is persistent, when its owner is alive, and
    when the owner lives in another PID namespace than PID_NAMESPACE, because
    its pid then means nothing here.

    Args:
        process_of: looks up a pid, as read_process does.
        pid_namespace: the PID namespace of the caller's ``/proc``.
    """
    if owner is None or owner.lifetime != "process":
        return None
    if owner.pid_namespace != pid_namespace:
        return None
    info = process_of(owner.pid)
    if info is None:
        return f"its owner process {owner.pid} has exited"
    if info.state in ("Z", "X"):
        return f"its owner process {owner.pid} has exited (state {info.state})"
    if info.start_time != owner.start_time:
        return (
            f"its owner process {owner.pid} has exited, and that pid now belongs "
            f"to a process started at tick {info.start_time}, not "
            f"{owner.start_time}"
        )
    return None


def read_lab_record(path: Path) -> Mapping[str, Any] | None:
    """Return the JSON object of a lab record, None if it is gone or unreadable."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.debug("lab record %s not readable, left alone: %s", path, exc)
        return None
    return record if isinstance(record, Mapping) else None
