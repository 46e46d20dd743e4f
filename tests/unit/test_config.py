from pathlib import Path

import pytest

from shieldproxy.cli import main
from shieldproxy.config import ConfigError, DemoConfig, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def test_demo_example_loads_as_defaults():
    assert load_config(CONFIG_DIR / "demo.yaml", DemoConfig) == DemoConfig()


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path, DemoConfig) == DemoConfig()


BAD_FILES = {
    "unknown key": ("freez_s: 20\n", "freez_s: Extra inputs are not permitted"),
    "wrong type": ("freeze_s: soon\n", "freeze_s: Input should be a valid number"),
    "negative freeze": ("freeze_s: -1\n", "freeze_s: Input should be greater than 0"),
    "freeze too long": ("freeze_s: 7200\n", "freeze_s: Input should be less than"),
    "ip version": ("ip_version: 5\n", "ip_version: Input should be 4 or 6"),
    "zero rate": ("rate_bytes_per_s: 0\n", "rate_bytes_per_s: Input should be"),
    "small buffer": ("receiver_rcvbuf_bytes: 10\n", "receiver_rcvbuf_bytes: Input"),
    "not a mapping": ("- 1\n- 2\n", "must be a mapping of settings, not a list"),
    "not yaml": ("freeze_s: [1\n", "is not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_names_field(tmp_path, name):
    text, expected = BAD_FILES[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, DemoConfig)
    message = str(caught.value)
    assert str(path) in message
    assert expected in message


def test_missing_file_reported(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read config file .*absent.yaml"):
        load_config(path, DemoConfig)


def test_demo_command_rejects_bad_config(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("freeze_s: -3\n")
    assert main(["demo", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "freeze_s: Input should be greater than 0" in error


def test_demo_command_rejects_bad_rate_option(capsys):
    assert main(["demo", "--rate", "0"]) == 2
    error = capsys.readouterr().err
    assert "(command line)" in error
    assert "rate_bytes_per_s" in error
