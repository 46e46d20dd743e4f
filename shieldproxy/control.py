"""The daemon's control socket: one JSON object per line, each way.

A request is ``{"command": NAME, ...arguments}``. The answer to it is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": MESSAGE}``. The
socket is a Unix stream socket, created with mode 0600 by default, so file
permissions decide who may freeze and release.

This module is the client side and the message format. It imports nothing
heavy, because CRIU's action script calls it at every stage. The daemon's side
is in :mod:`shieldproxy.control_server`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

MAX_REQUEST_BYTES = 1024 * 1024
COMMANDS = ("status", "flows", "freeze", "thaw", "announce", "release")


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
