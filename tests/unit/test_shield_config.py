import json
from pathlib import Path

import pytest
import yaml

from shieldproxy.config import (
    ConfigError,
    ControlConfig,
    DemoConfig,
    LimitsConfig,
    ShieldConfig,
    load_config,
)
from shieldproxy.config_cli import check_main, schema_main
from shieldproxy.kernel.rules import Scope
from shieldproxy.tcp.flow import FlowLimits, TricklePolicy

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"

SCOPES = """\
scopes:
  - name: web
    addresses: [198.18.2.10]
    ports: [80, 443]
  - name: db
    addresses: [198.18.2.20, "2001:2:0:2::20"]
    ports: [5432]
"""
VALID = "mode: gateway\n" + SCOPES


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shield.yaml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> ShieldConfig:
    return load_config(write(tmp_path, text), ShieldConfig)


def two_scopes(first: str, second: str) -> str:
    return (
        "mode: gateway\nscopes:\n"
        f"  - {{name: one, {first}}}\n"
        f"  - {{name: two, {second}}}\n"
    )


def test_example_files_load():
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    names = {path.name for path in paths}
    assert {"demo.yaml", "gateway.yaml", "sidecar.yaml"} <= names
    for path in paths:
        data = yaml.safe_load(path.read_text())
        model = ShieldConfig if "mode" in data else DemoConfig
        assert isinstance(load_config(path, model), model), path


def test_gateway_example_values():
    config = load_config(CONFIG_DIR / "gateway.yaml", ShieldConfig)
    assert config.mode == "gateway"
    assert config.netns == "sp-gateway"
    assert [scope.name for scope in config.scopes] == ["web", "db"]
    assert config.queues.first == 0
    assert config.queues.last == 1
    assert config.control.socket_mode == 0o600
    assert config.metrics.address == "127.0.0.1:9464"
    assert config.metrics.endpoint() == ("127.0.0.1", 9464)


def test_sidecar_example_values():
    config = load_config(CONFIG_DIR / "sidecar.yaml", ShieldConfig)
    assert config.mode == "sidecar"
    assert config.netns is None
    assert config.scope("app").addresses == ["198.18.2.2", "2001:2:0:2::2"]
    assert config.scope("app").ports == [8080]
    assert config.control.socket_path == Path("/run/shieldproxy/app.sock")
    assert config.metrics.endpoint() is None


def test_defaults():
    config = ShieldConfig.model_validate(yaml.safe_load(VALID))
    assert config.netns is None
    assert config.queues.first == 0
    assert config.queues.last == 0
    assert config.limits.per_flow_buffer_bytes == 32 * 1024 * 1024
    assert config.limits.total_buffer_bytes == 1024**3
    assert config.limits.challenge_acks_per_s == 10
    assert config.limits.max_flows == 100_000
    assert config.window.policy == "hold"
    assert config.timestamps.policy == "advance"
    assert config.freeze.max_freeze_s == 3600
    assert config.freeze.on_expiry == "drop"
    assert config.control.socket_path == Path("/run/shieldproxy/control.sock")
    assert config.control.socket_mode == 0o600
    assert config.metrics.address is None
    assert config.logging.level == "INFO"
    assert config.logging.format == "text"
    assert config.state_dir == Path("/var/lib/shieldproxy")


BAD_FILES = {
    # wrong types
    "mode not a mode": (
        "mode: router\n" + SCOPES,
        "mode: Input should be 'gateway' or 'sidecar'",
    ),
    "ports not a list": (
        "mode: gateway\nscopes: [{name: web, addresses: [198.18.2.10], ports: http}]\n",
        "scopes.0.ports: Input should be a valid list",
    ),
    "limit not a number": (
        VALID + "limits: {per_flow_buffer_bytes: lots}\n",
        "limits.per_flow_buffer_bytes: Input should be a valid integer",
    ),
    "address not a string": (
        "mode: gateway\nscopes: [{name: web, addresses: [3325167114]}]\n",
        "scopes.0.addresses.0: Input should be a valid string",
    ),
    "yes as a limit": (
        VALID + "limits: {max_flows: yes}\n",
        "limits.max_flows: Input should be a valid integer",
    ),
    "bool as a port": (
        "mode: gateway\n"
        "scopes: [{name: web, addresses: [198.18.2.10], ports: [true]}]\n",
        "scopes.0.ports.0: Input should be a valid integer",
    ),
    "bool as socket mode": (
        VALID + "control: {socket_mode: true}\n",
        "control.socket_mode: Input should be a valid integer",
    ),
    "string as interval": (
        VALID + "window: {trickle_interval_s: '5'}\n",
        "window.trickle_interval_s: Input should be a valid number",
    ),
    "scopes not a list": (
        "mode: gateway\nscopes: {name: web}\n",
        "scopes: Input should be a valid list",
    ),
    # unknown keys
    "unknown top-level key": (
        VALID + "modes: gateway\n",
        "modes: Extra inputs are not permitted",
    ),
    "unknown nested key": (
        VALID + "limits: {max_flow: 10}\n",
        "limits.max_flow: Extra inputs are not permitted",
    ),
    "unknown scope key": (
        "mode: gateway\nscopes: [{name: web, addresses: [198.18.2.10], port: 80}]\n",
        "scopes.0.port: Extra inputs are not permitted",
    ),
    # overlapping scopes
    "same address shared port": (
        two_scopes(
            "addresses: [198.18.2.10], ports: [80, 443]",
            "addresses: [198.18.2.10], ports: [443, 8443]",
        ),
        "scopes: Scopes 'one' and 'two' overlap: 198.18.2.10 and 198.18.2.10 "
        "share addresses and both match port 443",
    ),
    "network contains address, all ports": (
        two_scopes(
            "addresses: [198.18.2.0/24]",
            "addresses: [198.18.2.10], ports: [80]",
        ),
        "scopes: Scopes 'one' and 'two' overlap: 198.18.2.0/24 and 198.18.2.10 "
        "share addresses and both match port 80",
    ),
    "both all ports": (
        two_scopes("addresses: [198.18.0.0/16]", "addresses: [198.18.2.0/24]"),
        "both match every port",
    ),
    "ipv6 network overlap": (
        two_scopes(
            "addresses: [198.18.2.10, '2001:2:0:2::/64']",
            "addresses: ['2001:2:0:2::20'], ports: [22]",
        ),
        "scopes: Scopes 'one' and 'two' overlap: 2001:2:0:2::/64 and 2001:2:0:2::20",
    ),
    "duplicate scope name": (
        two_scopes("addresses: [198.18.2.10]", "addresses: [198.18.2.20]").replace(
            "name: two", "name: one"
        ),
        "scopes: Scope name 'one' is used more than once",
    ),
    # limits
    "negative per-flow buffer": (
        VALID + "limits: {per_flow_buffer_bytes: -1}\n",
        "limits.per_flow_buffer_bytes: Input should be greater than 0",
    ),
    "negative total buffer": (
        VALID + "limits: {total_buffer_bytes: -5}\n",
        "limits.total_buffer_bytes: Input should be greater than 0",
    ),
    "zero max flows": (
        VALID + "limits: {max_flows: 0}\n",
        "limits.max_flows: Input should be greater than 0",
    ),
    "zero challenge acks": (
        VALID + "limits: {challenge_acks_per_s: 0}\n",
        "limits.challenge_acks_per_s: Input should be greater than or equal to 1",
    ),
    "too many challenge acks": (
        VALID + "limits: {challenge_acks_per_s: 10001}\n",
        "limits.challenge_acks_per_s: Input should be less than or equal to 10000",
    ),
    "total below per-flow": (
        VALID + "limits: {per_flow_buffer_bytes: 2048, total_buffer_bytes: 1024}\n",
        "limits: total_buffer_bytes 1024 is less than per_flow_buffer_bytes 2048",
    ),
    # queues
    "queue first above last": (
        VALID + "queues: {first: 3, last: 1}\n",
        "queues: first 3 is greater than last 1",
    ),
    "queue number too big": (
        VALID + "queues: {last: 65536}\n",
        "queues.last: Input should be less than or equal to 65535",
    ),
    "negative queue number": (
        VALID + "queues: {first: -1}\n",
        "queues.first: Input should be greater than or equal to 0",
    ),
    # scopes
    "uppercase scope name": (
        "mode: gateway\nscopes: [{name: Web, addresses: [198.18.2.10]}]\n",
        "scopes.0.name: Input should be 1-32 lowercase letters, digits or '-', "
        "starting with a letter or digit, got 'Web'",
    ),
    "scope name starts with dash": (
        "mode: gateway\nscopes: [{name: -web, addresses: [198.18.2.10]}]\n",
        "scopes.0.name: Input should be 1-32 lowercase",
    ),
    "scope name too long": (
        f"mode: gateway\nscopes: [{{name: {'a' * 33}, addresses: [198.18.2.10]}}]\n",
        "scopes.0.name: Input should be 1-32 lowercase",
    ),
    "empty scope name": (
        "mode: gateway\nscopes: [{name: '', addresses: [198.18.2.10]}]\n",
        "scopes.0.name: Input should be 1-32 lowercase",
    ),
    "port too big": (
        two_scopes(
            "addresses: [198.18.2.10]", "addresses: [198.18.2.20], ports: [65536]"
        ),
        "scopes.1.ports.0: Input should be less than or equal to 65535",
    ),
    "port zero": (
        "mode: gateway\nscopes: [{name: web, addresses: [198.18.2.10], ports: [0]}]\n",
        "scopes.0.ports.0: Input should be greater than or equal to 1",
    ),
    "duplicate port": (
        "mode: gateway\n"
        "scopes: [{name: web, addresses: [198.18.2.10], ports: [80, 80]}]\n",
        "scopes.0.ports: List should not contain the port 80 twice",
    ),
    "duplicate address": (
        "mode: gateway\n"
        "scopes: [{name: web, addresses: [198.18.2.10, 198.18.2.10/32]}]\n",
        "scopes.0.addresses: List should not contain the address 198.18.2.10/32",
    ),
    "bad address": (
        "mode: gateway\nscopes: [{name: web, addresses: [198.18.2.300]}]\n",
        "scopes.0.addresses.0: Input should be an IPv4 or IPv6 address or network",
    ),
    "host bits set": (
        "mode: gateway\nscopes: [{name: web, addresses: [198.18.2.1/24]}]\n",
        "got '198.18.2.1/24' (198.18.2.1/24 has host bits set)",
    ),
    "ipv6 zone": (
        "mode: gateway\nscopes: [{name: web, addresses: ['fe80::1%eth0']}]\n",
        "scopes.0.addresses.0: Input should be an IPv4 or IPv6 address",
    ),
    "no addresses": (
        "mode: gateway\nscopes: [{name: web, addresses: []}]\n",
        "scopes.0.addresses: List should have at least 1 item",
    ),
    "bad interface": (
        "mode: gateway\n"
        "scopes: [{name: web, addresses: [198.18.2.10], interface: 'eth 0'}]\n",
        "scopes.0.interface: Input should be an interface name",
    ),
    "interface too long": (
        "mode: gateway\n"
        "scopes: [{name: web, addresses: [198.18.2.10], "
        "interface: abcdefghijklmnop}]\n",
        "scopes.0.interface: Input should be an interface name",
    ),
    "interface with newline": (
        "mode: gateway\n"
        'scopes: [{name: web, addresses: [198.18.2.10], interface: "eth0\\n"}]\n',
        "scopes.0.interface: Input should be an interface name",
    ),
    # metrics
    "metrics host name": (
        VALID + "metrics: {address: 'localhost:9464'}\n",
        "metrics.address: Input should be IP:PORT",
    ),
    "metrics no port": (
        VALID + "metrics: {address: 127.0.0.1}\n",
        "metrics.address: Input should be IP:PORT",
    ),
    "metrics ipv6 no brackets": (
        VALID + "metrics: {address: '::1:9464'}\n",
        "(put an IPv6 host in brackets)",
    ),
    "metrics ipv4 in brackets": (
        VALID + "metrics: {address: '[127.0.0.1]:9464'}\n",
        "metrics.address: Input should be IP:PORT",
    ),
    "metrics port zero": (
        VALID + "metrics: {address: '127.0.0.1:0'}\n",
        "metrics.address: Input should be IP:PORT",
    ),
    "metrics port too big": (
        VALID + "metrics: {address: '[::1]:70000'}\n",
        "(port '70000' is not in 1-65535)",
    ),
    # required keys
    "missing mode": (SCOPES, "mode: Field required"),
    "missing scopes": ("mode: gateway\n", "scopes: Field required"),
    "empty scopes": (
        "mode: sidecar\nscopes: []\n",
        "scopes: List should have at least 1 item after validation, not 0",
    ),
    # control socket
    "socket mode not octal": (
        VALID + "control: {socket_mode: '0999'}\n",
        "control.socket_mode: Input should be an octal file mode such as 0600, "
        "got '0999'",
    ),
    "socket mode decimal 600": (
        VALID + "control: {socket_mode: 600}\n",
        "control.socket_mode: Input should be a file mode from 0000 to 0777, got 01130",
    ),
    "socket mode negative": (
        VALID + "control: {socket_mode: -1}\n",
        "control.socket_mode: Input should be a file mode from 0000 to 0777",
    ),
    "relative socket path": (
        VALID + "control: {socket_path: control.sock}\n",
        "control.socket_path: Input should be an absolute path, got 'control.sock'",
    ),
    "socket path too long": (
        VALID + f"control: {{socket_path: /run/{'s' * 103}}}\n",
        "control.socket_path: Input should be a socket path of at most 107 bytes",
    ),
    # other sections
    "bad netns name": (
        VALID + "netns: ../gateway\n",
        "netns: Input should be a network namespace name",
    ),
    "netns dot dot": (
        VALID + "netns: '..'\n",
        "netns: Input should be a network namespace name",
    ),
    "relative state dir": (
        VALID + "state_dir: state\n",
        "state_dir: Input should be an absolute path",
    ),
    "zero trickle interval": (
        VALID + "window: {policy: trickle, trickle_interval_s: 0}\n",
        "window.trickle_interval_s: Input should be greater than 0",
    ),
    "unknown window policy": (
        VALID + "window: {policy: open}\n",
        "window.policy: Input should be 'hold' or 'trickle'",
    ),
    "freeze too long": (
        VALID + "freeze: {max_freeze_s: 604801}\n",
        "freeze.max_freeze_s: Input should be less than or equal to 604800",
    ),
    "unknown expiry action": (
        VALID + "freeze: {on_expiry: kill}\n",
        "freeze.on_expiry: Input should be 'drop' or 'release'",
    ),
    "lowercase log level": (
        VALID + "logging: {level: debug}\n",
        "logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_names_field(tmp_path, name):
    text, expected = BAD_FILES[name]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ShieldConfig)
    message = str(caught.value)
    assert str(path) in message
    assert expected in message
    assert "Value error" not in message


GOOD_SCOPES = {
    "network and address with disjoint ports": two_scopes(
        "addresses: [198.18.2.0/24], ports: [80]",
        "addresses: [198.18.2.10], ports: [443]",
    ),
    "same ports in different families": two_scopes(
        "addresses: [198.18.0.0/15], ports: [80]",
        "addresses: ['2001:2::/48'], ports: [80]",
    ),
    "adjacent networks": two_scopes(
        "addresses: [198.18.2.0/25]", "addresses: [198.18.2.128/25]"
    ),
}


@pytest.mark.parametrize("name", sorted(GOOD_SCOPES))
def test_disjoint_scopes_accepted(tmp_path, name):
    config = load_text(tmp_path, GOOD_SCOPES[name])
    assert [scope.name for scope in config.scopes] == ["one", "two"]


def test_addresses_normalised(tmp_path):
    config = load_text(
        tmp_path,
        "mode: gateway\nscopes:\n  - name: web\n"
        "    addresses: ['2001:2:0:2:0:0:0:20', 198.18.2.10, "
        "198.18.2.0/255.255.255.0, '2001:0002::/48']\n",
    )
    assert config.scopes[0].addresses == [
        "2001:2:0:2::20",
        "198.18.2.10",
        "198.18.2.0/24",
        "2001:2::/48",
    ]


@pytest.mark.parametrize(
    ("text", "mode"),
    [("'0600'", 0o600), ("0600", 0o600), ("'0o640'", 0o640), ("384", 0o600)],
)
def test_socket_mode_forms(tmp_path, text, mode):
    config = load_text(tmp_path, VALID + f"control: {{socket_mode: {text}}}\n")
    assert config.control.socket_mode == mode


def test_socket_mode_word_rejected():
    with pytest.raises(ValueError, match="octal file mode such as 0600, got 'rw'"):
        ControlConfig.model_validate({"socket_mode": "rw"})


def test_limits_equal_totals_accepted():
    limits = LimitsConfig(per_flow_buffer_bytes=4096, total_buffer_bytes=4096)
    assert limits.total_buffer_bytes == 4096


def test_metrics_ipv6_endpoint(tmp_path):
    config = load_text(tmp_path, VALID + "metrics: {address: '[::1]:9464'}\n")
    assert config.metrics.endpoint() == ("::1", 9464)


def test_hook_by_mode(tmp_path):
    gateway = load_text(tmp_path, VALID)
    sidecar = load_text(tmp_path, VALID.replace("gateway", "sidecar"))
    assert gateway.hook == "FORWARD"
    assert sidecar.hook == "INPUT"


def test_scope_lookup(tmp_path):
    config = load_text(tmp_path, VALID)
    assert config.scope("db").ports == [5432]
    with pytest.raises(KeyError) as caught:
        config.scope("cache")
    message = str(caught.value)
    assert "'cache'" in message
    assert "web, db" in message


def test_rule_scopes_per_address_and_port(tmp_path):
    config = load_text(tmp_path, VALID)
    web = config.rule_scopes("web")
    db = config.rule_scopes("db")
    assert web == [
        Scope(address="198.18.2.10", port=80),
        Scope(address="198.18.2.10", port=443),
    ]
    assert db == [
        Scope(address="198.18.2.20", port=5432),
        Scope(address="2001:2:0:2::20", port=5432),
    ]
    assert [scope.family for scope in db] == [4, 6]


def test_rule_scopes_all_ports_with_interface(tmp_path):
    config = load_text(
        tmp_path,
        "mode: gateway\nscopes:\n  - name: lan\n"
        "    addresses: [198.18.4.0/24, '2001:2:0:4::/64', 198.18.5.1]\n"
        "    interface: sp-up+\n",
    )
    scopes = config.rule_scopes("lan")
    assert len(scopes) == 3
    assert [scope.address for scope in scopes] == [
        "198.18.4.0/24",
        "2001:2:0:4::/64",
        "198.18.5.1",
    ]
    assert all(scope.port is None for scope in scopes)
    assert all(scope.in_interface == "sp-up+" for scope in scopes)
    assert all(scope.out_interface is None for scope in scopes)


def test_rule_scopes_unknown_name(tmp_path):
    config = load_text(tmp_path, VALID)
    with pytest.raises(KeyError, match="web, db"):
        config.rule_scopes("cache")


def test_flow_limits_mapping(tmp_path):
    config = load_text(
        tmp_path,
        VALID + "limits: {per_flow_buffer_bytes: 65536, challenge_acks_per_s: 3}\n",
    )
    limits = config.flow_limits()
    assert isinstance(limits, FlowLimits)
    assert limits.max_buffer_bytes == 65536
    assert limits.challenge_acks_per_s == 3


def test_trickle_policy_hold_is_none(tmp_path):
    config = load_text(tmp_path, VALID + "window: {trickle_step_bytes: 99}\n")
    assert config.trickle_policy() is None


def test_trickle_policy_mapping(tmp_path):
    config = load_text(
        tmp_path,
        VALID + "window: {policy: trickle, trickle_step_bytes: 512, "
        "trickle_interval_s: 2.5}\n",
    )
    assert config.trickle_policy() == TricklePolicy(step_bytes=512, interval_s=2.5)


def test_check_valid_file(tmp_path, capsys):
    path = write(tmp_path, VALID)
    assert check_main(path) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: valid (mode gateway, 2 scopes: web, db)\n"
    assert captured.err == ""


def test_check_one_scope_singular(capsys):
    path = CONFIG_DIR / "sidecar.yaml"
    assert check_main(path) == 0
    assert capsys.readouterr().out == f"{path}: valid (mode sidecar, 1 scope: app)\n"


def test_check_invalid_file(tmp_path, capsys):
    path = write(tmp_path, VALID + "queues: {first: 2, last: 1}\n")
    assert check_main(path) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"invalid config file {path}:" in captured.err
    assert "queues: first 2 is greater than last 1" in captured.err


def test_check_missing_file(tmp_path, capsys):
    path = tmp_path / "absent.yaml"
    assert check_main(path) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_schema_prints_json(capsys):
    assert schema_main() == 0
    schema = json.loads(capsys.readouterr().out)
    assert "scopes" in schema["properties"]
    assert sorted(schema["required"]) == ["mode", "scopes"]
    assert schema["additionalProperties"] is False
    scope = schema["$defs"]["ScopeConfig"]
    assert scope["properties"]["ports"]["description"]


def test_limits_at_boundary_accepted(tmp_path):
    name = "a" * 32
    socket_path = "/run/" + "s" * 102
    config = load_text(
        tmp_path,
        f"mode: gateway\nscopes: [{{name: {name}, addresses: [198.18.2.10]}}]\n"
        f"control: {{socket_path: {socket_path}, socket_mode: 0777}}\n"
        "queues: {first: 65535, last: 65535}\n"
        "freeze: {max_freeze_s: 604800}\n",
    )
    assert config.scopes[0].name == name
    assert config.control.socket_path == Path(socket_path)
    assert config.control.socket_mode == 0o777
    assert config.queues.first == 65535
    assert config.freeze.max_freeze_s == 604800
