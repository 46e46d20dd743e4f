"""`shieldproxy flows list` and `flows export` on journals of JournalWriter."""

import json

import pytest

from shieldproxy.cli import build_parser, main
from shieldproxy.journal import journal_path
from shieldproxy.tcp.snapshot import FlowKey

from .test_journal import pattern, write_flows

KEY = FlowKey.create("198.18.2.2", 5001, "198.18.1.2", 40000)
OTHER_KEY = FlowKey.create("2001:2:0:2::2", 5001, "2001:2:0:1::2", 40001)


def write_journal(state_dir, scope, flows):
    """Write STATE_DIR/SCOPE/journal with FLOWS: {key: (data ranges, ack offset)}."""
    path = journal_path(state_dir / scope)
    write_flows(path, scope, flows)
    return path


@pytest.fixture
def state_dir(tmp_path):
    """A state directory with scope web (two flows) and scope api (one flow)."""
    folder = tmp_path / "state"
    write_journal(
        folder,
        "web",
        {KEY: ([(0, 3000), (3000, 500)], 3000), OTHER_KEY: ([(0, 100)], 100)},
    )
    write_journal(folder, "api", {KEY: ([(0, 10)], 10)})
    return folder


def test_list_prints_every_journal(state_dir, capsys):
    assert main(["flows", "list", "--state-dir", str(state_dir)]) == 0
    listings = json.loads(capsys.readouterr().out)
    by_scope = {listing["scope"]: listing for listing in listings}
    assert sorted(by_scope) == ["api", "web"]
    web = by_scope["web"]
    assert web["journal"] == str(state_dir / "web" / "journal")
    assert web["torn_tail_bytes"] == 0
    flows = {flow["flow"]: flow for flow in web["flows"]}
    assert flows[str(KEY)]["acknowledged_bytes"] == 3000
    assert flows[str(KEY)]["unacknowledged_bytes"] == 500
    assert flows[str(KEY)]["missing_bytes"] == 0
    assert flows[str(OTHER_KEY)]["acknowledged_bytes"] == 100


def test_list_one_scope(state_dir, capsys):
    assert main(["flows", "list", "--state-dir", str(state_dir), "--scope", "api"]) == 0
    (listing,) = json.loads(capsys.readouterr().out)
    assert listing["scope"] == "api"


def test_export_writes_acknowledged_bytes(state_dir, tmp_path, capsys):
    out = tmp_path / "flow.bin"
    argv = ["flows", "export", "--state-dir", str(state_dir), "--scope", "web"]
    argv += ["--flow", str(KEY), "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes() == pattern(0, 3000)
    report = capsys.readouterr().out
    assert f"wrote 3000 bytes of flow {KEY} (scope web" in report
    assert "500 more bytes are journaled but were not acknowledged" in report


def test_export_ipv6_flow(state_dir, tmp_path):
    out = tmp_path / "flow.bin"
    argv = ["flows", "export", "--state-dir", str(state_dir)]
    argv += ["--flow", str(OTHER_KEY), "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes() == pattern(0, 100)


def test_export_from_config_state_dir(state_dir, tmp_path):
    config = tmp_path / "shield.yaml"
    config.write_text(
        "mode: sidecar\n"
        "scopes:\n  - name: web\n    addresses: [198.18.2.2]\n"
        f"state_dir: {state_dir}\n"
    )
    out = tmp_path / "flow.bin"
    # --config may come before the subcommand, as for 'shieldproxy flows'
    argv = ["flows", "--config", str(config), "export", "--scope", "web"]
    argv += ["--flow", str(KEY), "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes() == pattern(0, 3000)
    second = tmp_path / "second.bin"
    argv = ["flows", "export", "--config", str(config), "--scope", "web"]
    argv += ["--flow", str(KEY), "--out", str(second)]
    assert main(argv) == 0
    assert second.read_bytes() == pattern(0, 3000)


def test_export_from_journal_file(state_dir, tmp_path):
    out = tmp_path / "flow.bin"
    argv = ["flows", "export", "--journal", str(state_dir / "api" / "journal")]
    argv += ["--flow", str(KEY), "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes() == pattern(0, 10)


def test_export_to_stdout(state_dir, capsysbinary):
    argv = ["flows", "export", "--state-dir", str(state_dir), "--scope", "api"]
    argv += ["--flow", str(KEY), "--out", "-"]
    assert main(argv) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == pattern(0, 10)
    assert b"wrote 10 bytes" in captured.err


def test_export_keeps_existing_file(state_dir, tmp_path, capsys):
    out = tmp_path / "flow.bin"
    out.write_bytes(b"keep me")
    argv = ["flows", "export", "--state-dir", str(state_dir), "--scope", "api"]
    argv += ["--flow", str(KEY), "--out", str(out)]
    assert main(argv) == 1
    assert out.read_bytes() == b"keep me"
    assert f"{out} exists. Pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert out.read_bytes() == pattern(0, 10)


def test_export_ambiguous_flow_needs_scope(state_dir, tmp_path, capsys):
    out = tmp_path / "flow.bin"
    argv = ["flows", "export", "--state-dir", str(state_dir)]
    argv += ["--flow", str(KEY), "--out", str(out)]
    assert main(argv) == 1
    assert "in the journals of scopes api, web. Pass --scope" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_export_unknown_flow_lists_flows(state_dir, tmp_path, capsys):
    out = tmp_path / "flow.bin"
    argv = ["flows", "export", "--state-dir", str(state_dir), "--scope", "web"]
    argv += ["--flow", "198.18.1.2:1->198.18.2.2:1", "--out", str(out)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "flow '198.18.1.2:1->198.18.2.2:1' not found" in error
    assert f"{KEY} (scope web)" in error
    assert f"{OTHER_KEY} (scope web)" in error
    assert "'shieldproxy flows list'" in error
    assert not out.exists()


def test_export_reports_missing_bytes(tmp_path, capsys):
    state_dir = tmp_path / "state"
    # acknowledged up to 1000, but the journal contains only bytes 0-399
    write_journal(state_dir, "web", {KEY: ([(0, 400)], 1000)})
    out = tmp_path / "flow.bin"
    argv = ["flows", "export", "--state-dir", str(state_dir)]
    argv += ["--flow", str(KEY), "--out", str(out)]
    assert main(argv) == 1
    assert out.read_bytes() == pattern(0, 400)
    error = capsys.readouterr().err
    assert "lacks 600 acknowledged bytes" in error
    assert "after its first 400 bytes" in error
    assert main(["flows", "list", "--state-dir", str(state_dir)]) == 0
    (listing,) = json.loads(capsys.readouterr().out)
    assert listing["flows"][0]["missing_bytes"] == 600


def test_no_journal_names_where_it_looked(tmp_path, capsys):
    empty = tmp_path / "state"
    empty.mkdir()
    assert main(["flows", "list", "--state-dir", str(empty)]) == 1
    error = capsys.readouterr().err
    assert f"no journal found: looked for {empty}/*/journal (--state-dir)" in error


def test_missing_state_dir_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["flows", "list", "--state-dir", str(missing)]) == 1
    assert f"state directory {missing} (--state-dir) not found" in (
        capsys.readouterr().err
    )


def test_missing_scope_lists_journals(state_dir, capsys):
    assert main(["flows", "list", "--state-dir", str(state_dir), "--scope", "db"]) == 1
    error = capsys.readouterr().err
    assert f"scope 'db' has no journal at {state_dir / 'db' / 'journal'}" in error
    assert "Scopes with a journal" in error
    assert "api, web" in error


def test_memory_durability_explained(tmp_path, capsys):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = tmp_path / "shield.yaml"
    config.write_text(
        "mode: gateway\n"
        "scopes:\n  - name: web\n    addresses: [198.18.2.2]\n"
        f"state_dir: {state_dir}\ndurability: memory\n"
    )
    assert main(["flows", "list", "--config", str(config)]) == 1
    assert "sets durability: memory, so the daemon writes no journal" in (
        capsys.readouterr().err
    )


def test_journal_of_other_scope_rejected(state_dir, capsys):
    journal = state_dir / "api" / "journal"
    assert main(["flows", "list", "--journal", str(journal), "--scope", "web"]) == 1
    assert "is of scope 'api', not 'web'. Leave out --scope" in capsys.readouterr().err


def test_socket_option_rejected_for_journals(state_dir, capsys):
    argv = ["flows", "--socket", "/nonexistent.sock", "list"]
    assert main([*argv, "--state-dir", str(state_dir)]) == 1
    assert "--socket is not valid here" in capsys.readouterr().err


def test_bare_flows_still_asks_daemon():
    args = build_parser().parse_args(["flows", "--scope", "web"])
    assert args.flows_command is None
    assert args.scope == "web"
