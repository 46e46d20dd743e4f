"""Flow identity and the receive state a shield flow starts from."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .seq import seq_add

# Text form and IP version of the addresses seen most recently, emptied when
# full. Parsing an address with ipaddress costs microseconds, and a shield with
# many flows calls FlowKey.create and FlowKey.family for each of them.
_ADDRESS_CACHE_SIZE = 4096
_address_info: dict[str, tuple[str, int]] = {}


def _parse_address(text: str) -> tuple[str, int]:
    """Return the compressed text form and the version of an IP address.

    Raises ValueError, as :func:`ipaddress.ip_address` does, for text that is
    not an IPv4 or IPv6 address.
    """
    # Only str keys are looked up and cached. ip_address() also takes integers
    # and bytes, and a key of another type may be unhashable or equal to one
    # of a different value (1.0 == 1, but ip_address(1.0) raises).
    is_text = type(text) is str
    if is_text:
        info = _address_info.get(text)
        if info is not None:
            return info
    address = ipaddress.ip_address(text)
    info = (str(address), address.version)
    if is_text:
        if len(_address_info) >= _ADDRESS_CACHE_SIZE:
            _address_info.clear()
        _address_info[text] = info
    return info


@dataclass(frozen=True, order=True)
class FlowKey:
    """A TCP connection seen from the container: its own end, then the peer's.

    Addresses are stored in the compressed text form of :mod:`ipaddress`, so
    ``"2001:2:0:1::2"`` and ``"2001:2:0:1:0:0:0:2"`` name the same flow.
    """

    container_addr: str
    container_port: int
    peer_addr: str
    peer_port: int

    @classmethod
    def create(
        cls, container_addr: str, container_port: int, peer_addr: str, peer_port: int
    ) -> FlowKey:
        return cls(
            _parse_address(container_addr)[0],
            container_port,
            _parse_address(peer_addr)[0],
            peer_port,
        )

    @property
    def family(self) -> int:
        """IP version, 4 or 6."""
        return _parse_address(self.container_addr)[1]

    def __str__(self) -> str:
        def endpoint(addr: str, port: int) -> str:
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

        return (
            f"{endpoint(self.peer_addr, self.peer_port)}->"
            f"{endpoint(self.container_addr, self.container_port)}"
        )


@dataclass(frozen=True)
class FlowSnapshot:
    """The container's TCP state for one flow at the moment it stopped answering.

    Sequence numbers are raw 32-bit values. ``rcv_wup + rcv_wnd`` is the right
    edge of the window the container last advertised, which the shield must never
    move left.
    """

    key: FlowKey
    rcv_nxt: int
    """Next sequence number the container expects from the peer."""
    rcv_wup: int
    """Value of rcv_nxt when the container last sent a window update."""
    rcv_wnd: int
    """Window in bytes the container advertised at rcv_wup."""
    snd_una: int
    """Oldest sequence number the container sent that the peer has not acked."""
    snd_nxt: int
    """Sequence number of the next byte the container would send."""
    rcv_wscale: int
    """Shift the container applies to the windows it advertises."""
    snd_wscale: int
    """Shift the peer applies to the windows it advertises."""
    mss: int
    """Maximum segment size the container accepts from the peer."""
    sack_ok: bool
    """True when both ends negotiated SACK (RFC 2018)."""
    timestamps_ok: bool
    """True when both ends negotiated timestamps (RFC 7323)."""
    tsval: int
    """Container's TCP timestamp clock at ``taken_at``, in its units (ms)."""
    taken_at: float
    """CLOCK_MONOTONIC seconds at which ``tsval`` was read."""
    ts_recent: int | None = None
    """Last TSval the container saw from the peer, if known."""
    peer_fin: bool = False
    """True when the container had received the peer's FIN (CLOSE_WAIT,
    LAST_ACK or CLOSING): ``rcv_nxt`` counts the FIN, and no more data comes."""

    @property
    def right_edge(self) -> int:
        return seq_add(self.rcv_wup, self.rcv_wnd)
