import os
import stat

import pytest
import trio

from shieldproxy.control import ControlError, DaemonNotRunning, call, parse_request
from shieldproxy.control_server import serve_control


def test_parse_request_accepts_known_command():
    assert parse_request(b'{"command": "status"}') == {"command": "status"}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"not json", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"command": "reboot"}', "unknown command 'reboot'"),
        (b'{"scope": "web"}', "unknown command None"),
        (b"\xff\xfe", "not a JSON object"),
    ],
)
def test_parse_request_rejects_malformed(line, expected):
    with pytest.raises(ControlError, match=expected):
        parse_request(line)


def test_call_without_daemon_says_so(tmp_path):
    with pytest.raises(DaemonNotRunning, match="no shieldproxy daemon is listening"):
        call(tmp_path / "absent.sock", {"command": "status"})


def test_server_answers_and_serializes(tmp_path):
    path = tmp_path / "control.sock"
    active = []
    seen = []

    async def handler(request):
        active.append(request["command"])
        assert len(active) == 1, "requests overlapped"
        await trio.sleep(0.05)
        seen.append(request["command"])
        active.pop()
        if request["command"] == "freeze":
            raise ControlError("freeze failed: scope 'x' not found")
        return {"echo": request["command"]}

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, 0o600, handler)
            mode = stat.S_IMODE(os.stat(path).st_mode)
            results = {}

            async def client(command):
                try:
                    results[command] = await trio.to_thread.run_sync(
                        call, path, {"command": command}
                    )
                except ControlError as exc:
                    results[command] = str(exc)

            async with trio.open_nursery() as clients:
                for command in ("status", "flows", "freeze"):
                    clients.start_soon(client, command)
            nursery.cancel_scope.cancel()
        return mode, results

    mode, results = trio.run(main)
    assert mode == 0o600
    assert results["status"] == {"echo": "status"}
    assert results["flows"] == {"echo": "flows"}
    assert results["freeze"] == "freeze failed: scope 'x' not found"
    assert sorted(seen) == ["flows", "freeze", "status"]
    assert not path.exists()
