import pytest

from shieldproxy.cli import _parse_windows


def test_announce_window_option_parsed():
    windows = _parse_windows(["198.18.1.2:40000->198.18.2.2:5001=10:2000"])
    assert windows == {
        "198.18.1.2:40000->198.18.2.2:5001": {"rcv_nxt": 10, "right_edge": 2000}
    }


@pytest.mark.parametrize(
    "item", ["no-equals", "flow=1", "flow=a:b", "=1:2", "flow=1:4294967296"]
)
def test_announce_window_option_rejected(item):
    with pytest.raises(ValueError, match="invalid --window"):
        _parse_windows([item])
