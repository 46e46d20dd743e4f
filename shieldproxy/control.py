"""The daemon's control socket: one JSON object per line, each way.

A request is ``{"command": NAME, ...arguments}``. The answer to it is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": MESSAGE}``. The
socket is a Unix stream socket, created with mode 0600 by default, so file
permissions decide who may freeze and release.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

MAX_REQUEST_BYTES = 1024 * 1024
COMMANDS = ("status", "flows", "freeze", "thaw", "announce", "release")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(RuntimeError):
    """A control request failed; the message is what the client prints."""


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket."""


def parse_request(line: bytes) -> dict[str, Any]:
    """Decode one request line, raising ControlError for anything malformed."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"invalid request: not a JSON object ({exc})") from None
    if not isinstance(request, dict):
        raise ControlError("invalid request: not a JSON object")
    command = request.get("command")
    if command not in COMMANDS:
        raise ControlError(
            f"invalid request: unknown command {command!r}, "
            f"expected one of {', '.join(COMMANDS)}"
        )
    return request


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True).encode() + b"\n"


async def serve_control(
    path: Path,
    mode: int,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept control connections on PATH until cancelled.

    Requests are handled one at a time across all clients, so two clients that
    freeze and thaw at once are serialized. The socket file is removed on exit.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    listener_socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask keeps the socket private from the moment it exists.
    old_umask = os.umask(0o777 & ~mode)
    try:
        await listener_socket.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    listener_socket.listen(16)
    lock = trio.Lock()
    try:
        task_status.started()
        async with trio.SocketListener(listener_socket) as listener:
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(_serve_client, stream, handler, lock)
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _serve_client(
    stream: trio.SocketStream, handler: Handler, lock: trio.Lock
) -> None:
    buffer = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > MAX_REQUEST_BYTES and b"\n" not in buffer:
                await stream.send_all(
                    encode({"ok": False, "error": "invalid request: line too long"})
                )
                return
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                async with lock:
                    response = await _answer(line, handler)
                try:
                    await stream.send_all(encode(response))
                except trio.BrokenResourceError:
                    return


async def _answer(line: bytes, handler: Handler) -> dict[str, Any]:
    try:
        request = parse_request(line)
        return {"ok": True, "result": await handler(request)}
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}


def call(path: Path, request: dict[str, Any], timeout_s: float = 30.0) -> Any:
    """Send one request to the daemon at PATH and return its result.

    Raises:
        ControlError: the daemon is not running, timed out, or returned an error.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout_s)
    try:
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"no shieldproxy daemon is listening on {path} ({exc.strerror}): "
                "start one with 'shieldproxy run --config FILE'"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on control socket {path}: run as its owner"
            ) from None
        client.sendall(encode(request))
        buffer = b""
        while b"\n" not in buffer:
            try:
                chunk = client.recv(65536)
            except TimeoutError:
                raise ControlError(
                    f"the daemon on {path} did not answer within {timeout_s:.0f} s"
                ) from None
            if not chunk:
                raise ControlError(f"the daemon on {path} closed the connection")
            buffer += chunk
    finally:
        client.close()
    response = json.loads(buffer.split(b"\n", 1)[0])
    if not response.get("ok"):
        raise ControlError(str(response.get("error")))
    return response.get("result")
