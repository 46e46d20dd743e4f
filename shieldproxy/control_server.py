"""The daemon's side of the control socket (see :mod:`shieldproxy.control`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .control import MAX_REQUEST_BYTES, ControlError, encode, parse_request

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


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
