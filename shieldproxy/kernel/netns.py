"""Run code and commands inside named network namespaces (``/run/netns/NAME``).

A socket stays in the network namespace of the thread that created it, so
``enter_netns`` lets the root process create NFQUEUE, raw and TCP sockets inside a
lab namespace and then go on using them from anywhere.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

# Names that `ip netns add` accepts and that cannot escape NETNS_DIR.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(RuntimeError):
    """A network namespace is missing or could not be entered or left."""


class NetnsCommandError(NetnsError):
    """A command run inside a network namespace failed."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stderr: str
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        detail = stderr.strip() or "(no stderr)"
        super().__init__(f"command {self.argv} {status}: {detail}")


def netns_path(name: str) -> Path:
    """Return ``/run/netns/NAME`` after checking that NAME is a plain file name.

    Raises:
        ValueError: NAME contains characters other than letters, digits, ``_.-``.
    """
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"invalid network namespace name {name!r}: "
            "use 1-64 letters, digits, '_', '.' or '-'"
        )
    return NETNS_DIR / name


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f"setns into {what} failed: {os.strerror(errno)}")


@contextmanager
def enter_netns(name: str) -> Iterator[None]:
    """Switch the calling thread into network namespace NAME for the block.

    Only the calling thread moves, and threads or child processes it starts inside
    the block begin in NAME too. On exit the thread goes back to the network
    namespace it was in before, also when the block raises.

    Raises:
        NetnsError: the namespace does not exist or setns(2) failed.
    """
    path = netns_path(name)
    try:
        target_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(
            f"network namespace {name!r} not found: {path} does not exist "
            "(create it with `ip netns add` or lab_up())"
        ) from None
    try:
        original_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target_fd)
        raise
    try:
        _setns(target_fd, f"network namespace {name!r}")
        try:
            yield
        finally:
            # Failing to switch back would leave this thread in the lab namespace
            # for whatever it runs next, so the error must propagate.
            _setns(original_fd, "the thread's original network namespace")
    finally:
        os.close(target_fd)
        os.close(original_fd)


def netns_command(
    name: str, argv: Sequence[str], *, new_session: bool = False
) -> list[str]:
    """Build an argv that runs ARGV in network namespace NAME through nsenter.

    Unlike ``ip netns exec``, nsenter keeps the caller's mount namespace, which
    CRIU needs to dump the process. ``new_session`` adds ``setsid`` so the process
    leads its own session, as CRIU expects of a process tree root.
    """
    command = ["nsenter", f"--net={netns_path(name)}"]
    if new_session:
        command.append("setsid")
    command.extend(argv)
    return command


def run_command(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ARGV, inside network namespace NETNS when given, and wait for it.

    Args:
        capture: collect stdout and stderr as text instead of passing ours on.
        timeout: seconds before the command is killed, None to wait forever.
        input: text written to the command's stdin.

    Raises:
        NetnsCommandError: the command was not found, timed out, or with
            ``check`` exited non-zero; the message contains the command and
            its stderr.
    """
    command = list(argv) if netns is None else netns_command(netns, argv)
    log.debug("running %s", command)
    try:
        result = subprocess.run(
            command,
            capture_output=capture,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stderr or b""
        text = partial if isinstance(partial, str) else partial.decode(errors="replace")
        raise NetnsCommandError(command, None, text) from exc
    except FileNotFoundError as exc:
        raise NetnsCommandError(command, 127, f"{exc}") from exc
    if check and result.returncode != 0:
        raise NetnsCommandError(command, result.returncode, result.stderr or "")
    return result


def run_in_netns(
    name: str,
    argv: Sequence[str],
    check: bool = True,
    capture: bool = True,
    *,
    timeout: float | None = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ARGV in network namespace NAME; see :func:`run_command`."""
    return run_command(
        argv, netns=name, check=check, capture=capture, timeout=timeout, input=input
    )
