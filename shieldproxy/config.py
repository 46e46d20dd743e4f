"""YAML configuration files, validated with pydantic.

Every model rejects unknown keys, so a misspelt key fails at startup instead of
being ignored. :func:`load_config` reports the file, the field path and the
reason for every invalid field.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# The interface pattern is the rules module's, so a name that loads here is one
# that Scope accepts. fullmatch() also rejects the trailing newline that '$'
# lets through.
from shieldproxy.kernel.rules import _IFACE_RE as IFACE_NAME_RE
from shieldproxy.kernel.rules import Hook, Scope
from shieldproxy.tcp.flow import FlowLimits, TricklePolicy


class ConfigError(ValueError):
    """Error for a configuration file that is missing, not YAML, or invalid."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoConfig(StrictModel):
    """Settings of ``shieldproxy demo``."""

    freeze_s: float = Field(
        20.0, gt=0, le=3600, description="Seconds the connection stays checkpointed."
    )
    ip_version: Literal[4, 6] = Field(4, description="IP version of the flow.")
    rate_bytes_per_s: int = Field(
        4 * 1024 * 1024,
        gt=0,
        le=1024**3,
        description="Rate at which the peer sends, in bytes per second.",
    )
    warmup_s: float = Field(
        2.0, ge=0.5, le=60, description="Seconds of streaming before the checkpoint."
    )
    after_s: float = Field(
        3.0, ge=0, le=60, description="Seconds the peer keeps sending after restore."
    )
    receiver_rcvbuf_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="SO_RCVBUF of the receiver; it sets the window the shield holds.",
    )
    baseline: bool = Field(
        True, description="Also run the scenario without the shield, for comparison."
    )


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_config(path: Path, model: type[ModelT]) -> ModelT:
    """Read PATH as YAML and validate it against MODEL.

    Raises:
        ConfigError: the file cannot be read, is not a YAML mapping, or has
            invalid fields; the message names the file and each field path.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of settings, "
            f"not a {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(path, exc)) from None


def format_errors(path: Path, error: ValidationError) -> str:
    """Return one line per invalid field: ``FILE: field.path: reason``."""
    lines = [f"invalid config file {path}:"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {location}: {item['msg']}")
    return "\n".join(lines)


# Settings of the shield daemon, in gateway or sidecar mode.

MIB = 1024 * 1024
GIB = 1024 * MIB
MAX_SCOPE_NAME_LEN = 32
# sockaddr_un.sun_path is 108 bytes on Linux, and Python 3.11 rejects a path
# that leaves no room for its NUL terminator.
MAX_SOCKET_PATH_BYTES = 107

_SCOPE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_network(value: str) -> str:
    """Return VALUE as the canonical text of an IPv4 or IPv6 address or network.

    A bare address stays a bare address (``2001:2:0:2:0::20`` becomes
    ``2001:2:0:2::20``), and a network keeps its prefix length.
    """
    try:
        if "%" in value:
            # ipaddress accepts an IPv6 zone such as fe80::1%eth0, but an iptables
            # -d match takes no zone.
            raise ValueError("an IPv6 zone ('%' suffix) is not supported")
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise PydanticCustomError(
            "ip_network",
            "Input should be an IPv4 or IPv6 address or network such as "
            "198.18.2.10 or 198.18.2.0/24 with no host bits set, "
            "got '{value}' ({reason})",
            {"value": value, "reason": str(exc)},
        ) from None
    if "/" in value:
        return str(network)
    return str(network.network_address)


def _check_scope_name(value: str) -> str:
    if len(value) > MAX_SCOPE_NAME_LEN or not _SCOPE_NAME_RE.fullmatch(value):
        raise PydanticCustomError(
            "scope_name",
            "Input should be 1-{max_len} lowercase letters, digits or '-', "
            "starting with a letter or digit, got '{value}'",
            {"value": value, "max_len": MAX_SCOPE_NAME_LEN},
        )
    return value


def _check_interface(value: str) -> str:
    if not IFACE_NAME_RE.fullmatch(value):
        raise PydanticCustomError(
            "interface_name",
            "Input should be an interface name of at most 15 letters, digits, "
            "'_', '.', '@' or '-', optionally ending in '+', got '{value}'",
            {"value": value},
        )
    return value


def _check_netns_name(value: str) -> str:
    if not _NETNS_NAME_RE.fullmatch(value) or value in (".", ".."):
        raise PydanticCustomError(
            "netns_name",
            "Input should be a network namespace name under /run/netns of "
            "1-64 letters, digits, '_', '.' or '-', got '{value}'",
            {"value": value},
        )
    return value


def _parse_file_mode(value: object) -> object:
    """Read a string such as ``"0600"`` as an octal file mode.

    PyYAML already reads an unquoted ``0600`` as the octal integer 384, so only
    quoted modes and ``0o600`` (a string in YAML 1.1) arrive here as strings.
    """
    if not isinstance(value, str):
        return value
    try:
        return int(value, 8)
    except ValueError:
        raise PydanticCustomError(
            "file_mode",
            "Input should be an octal file mode such as 0600, got '{value}'",
            {"value": value},
        ) from None


def _check_file_mode(value: int) -> int:
    if not 0 <= value <= 0o777:
        raise PydanticCustomError(
            "file_mode",
            "Input should be a file mode from 0000 to 0777, got {value}",
            {"value": f"0{value:o}" if value >= 0 else str(value)},
        )
    return value


def _check_absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise PydanticCustomError(
            "absolute_path",
            "Input should be an absolute path, got '{value}'",
            {"value": str(value)},
        )
    return value


def _check_socket_path(value: Path) -> Path:
    size = len(os.fsencode(value))
    if size > MAX_SOCKET_PATH_BYTES:
        raise PydanticCustomError(
            "socket_path",
            "Input should be a socket path of at most {max_bytes} bytes, "
            "got {size} bytes",
            {"max_bytes": MAX_SOCKET_PATH_BYTES, "size": size},
        )
    return value


def _check_listen_address(value: str) -> str:
    """Raise PydanticCustomError unless VALUE is ``IPv4:PORT`` or ``[IPv6]:PORT``."""
    try:
        _split_listen_address(value)
    except ValueError as exc:
        raise PydanticCustomError(
            "listen_address",
            "Input should be IP:PORT such as 127.0.0.1:9464 or [::1]:9464, "
            "got '{value}' ({reason})",
            {"value": value, "reason": str(exc)},
        ) from None
    return value


def _split_listen_address(value: str) -> tuple[str, int]:
    if value.startswith("["):
        host, separator, port_text = value[1:].partition("]:")
        if not separator:
            raise ValueError("an IPv6 host in brackets must be followed by ':PORT'")
        if ipaddress.ip_address(host).version != 6:
            raise ValueError("only an IPv6 host goes in brackets")
    else:
        host, separator, port_text = value.rpartition(":")
        if not separator:
            raise ValueError("the port is missing")
        if ipaddress.ip_address(host).version != 4:
            raise ValueError("put an IPv6 host in brackets")
    if (
        not (port_text.isascii() and port_text.isdigit())
        or not 1 <= int(port_text) <= 65535
    ):
        raise ValueError(f"port {port_text!r} is not in 1-65535")
    return host, int(port_text)


NetworkText = Annotated[str, AfterValidator(_check_network)]
TcpPort = Annotated[int, Field(strict=True, ge=1, le=65535)]


class ScopeConfig(StrictModel):
    """Container addresses and ports whose TCP peers the shield acknowledges."""

    name: Annotated[str, AfterValidator(_check_scope_name)] = Field(
        ...,
        description=(
            "Scope name, used in iptables chain names and in `--scope NAME`: "
            f"1-{MAX_SCOPE_NAME_LEN} lowercase letters, digits or '-'."
        ),
    )
    addresses: list[NetworkText] = Field(
        ...,
        min_length=1,
        description=(
            "Container IPv4 or IPv6 addresses or networks (no host bits set) "
            "that peers send to."
        ),
    )
    ports: list[TcpPort] = Field(
        default_factory=list,
        description="Container TCP ports, 1-65535. An empty list matches every port.",
    )
    interface: Annotated[str, AfterValidator(_check_interface)] | None = Field(
        None,
        description=(
            "Interface the peers' packets arrive on (iptables -i, where a trailing "
            "'+' matches a prefix). None matches every interface."
        ),
    )

    @field_validator("addresses")
    @classmethod
    def _reject_duplicate_addresses(cls, value: list[str]) -> list[str]:
        # 198.18.2.10 and 198.18.2.10/32 are the same network.
        _reject_duplicates([ipaddress.ip_network(text) for text in value], "address")
        return value

    @field_validator("ports")
    @classmethod
    def _reject_duplicate_ports(cls, value: list[int]) -> list[int]:
        _reject_duplicates(value, "port")
        return value

    def covers(self, address: str, port: int) -> bool:
        """Return True when the container end ADDRESS:PORT is in this scope."""
        if self.ports and port not in self.ports:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(text) for text in self.addresses)


def _reject_duplicates(values: Sequence[Hashable], what: str) -> None:
    seen: set[Hashable] = set()
    for value in values:
        if value in seen:
            raise PydanticCustomError(
                "duplicate",
                "List should not contain the {what} {value} twice",
                {"what": what, "value": str(value)},
            )
        seen.add(value)


class QueueConfig(StrictModel):
    """NFQUEUE queue numbers that receive the diverted packets."""

    first: int = Field(
        0, strict=True, ge=0, le=65535, description="First NFQUEUE queue number."
    )
    last: int = Field(
        0,
        strict=True,
        ge=0,
        le=65535,
        description=(
            "Last NFQUEUE queue number. Above `first`, the kernel spreads flows "
            "over first..last with --queue-balance."
        ),
    )

    @model_validator(mode="after")
    def _check_order(self) -> QueueConfig:
        if self.first > self.last:
            raise PydanticCustomError(
                "queue_range",
                "first {first} is greater than last {last}. Set last to at least first",
                {"first": self.first, "last": self.last},
            )
        return self


class LimitsConfig(StrictModel):
    """Bounds on the shield's memory and on the segments it sends."""

    per_flow_buffer_bytes: int = Field(
        32 * MIB,
        strict=True,
        gt=0,
        description=(
            "Max bytes one flow buffers past the container's last acknowledged "
            "byte. The window the container advertised is honoured even above it."
        ),
    )
    total_buffer_bytes: int = Field(
        GIB,
        strict=True,
        gt=0,
        description="Max bytes buffered by all flows together.",
    )
    challenge_acks_per_s: int = Field(
        10,
        strict=True,
        ge=1,
        le=10_000,
        description="Max challenge ACKs (RFC 5961) per flow per second.",
    )
    max_flows: int = Field(
        100_000,
        strict=True,
        gt=0,
        description="Max number of flows the shield tracks at once.",
    )

    @model_validator(mode="after")
    def _check_total(self) -> LimitsConfig:
        if self.total_buffer_bytes < self.per_flow_buffer_bytes:
            raise PydanticCustomError(
                "buffer_limits",
                "total_buffer_bytes {total} is less than per_flow_buffer_bytes "
                "{per_flow}. Raise total_buffer_bytes or lower "
                "per_flow_buffer_bytes",
                {
                    "total": self.total_buffer_bytes,
                    "per_flow": self.per_flow_buffer_bytes,
                },
            )
        return self


class WindowConfig(StrictModel):
    """Receive window the shield advertises once a peer has filled it."""

    policy: Literal["hold", "trickle"] = Field(
        "hold",
        description=(
            "'hold' keeps the container's right edge. 'trickle' opens "
            "trickle_step_bytes every trickle_interval_s so peers with "
            "TCP_USER_TIMEOUT keep seeing progress."
        ),
    )
    trickle_step_bytes: int = Field(
        1024,
        strict=True,
        gt=0,
        description="Bytes the window opens by per trickle step.",
    )
    trickle_interval_s: float = Field(
        5.0,
        strict=True,
        gt=0,
        le=3600,
        description="Seconds between trickle steps.",
    )


class TimestampConfig(StrictModel):
    """TCP timestamp clock of the shield and of the restored socket."""

    policy: Literal["advance", "hold"] = Field(
        "advance",
        description=(
            "'advance': the shield's TSval follows the container's clock and the "
            "restored socket's clock is moved forward to it. 'hold': the shield "
            "keeps TSval at the dumped value, so the restored clock is unchanged."
        ),
    )


class FreezeConfig(StrictModel):
    """Bound on how long one checkpoint may keep a scope shielded."""

    max_freeze_s: float = Field(
        3600.0,
        strict=True,
        gt=0,
        le=7 * 24 * 3600,
        description="Max seconds a scope stays shielded (at most 7 days).",
    )
    on_expiry: Literal["drop", "release"] = Field(
        "drop",
        description=(
            "Action after max_freeze_s: 'drop' keeps dropping the peers' packets "
            "until they time out. 'release' removes the rules, so peers reach a "
            "namespace without the socket and get RST."
        ),
    )


class ControlConfig(StrictModel):
    """Unix socket on which the daemon accepts control commands."""

    socket_path: Annotated[
        Path, AfterValidator(_check_absolute), AfterValidator(_check_socket_path)
    ] = Field(
        Path("/run/shieldproxy/control.sock"),
        description="Absolute path of the control socket.",
    )
    socket_mode: Annotated[
        int,
        BeforeValidator(_parse_file_mode, json_schema_input_type=int | str),
        AfterValidator(_check_file_mode),
    ] = Field(
        0o600,
        strict=True,
        description=(
            "File mode of the control socket, 0000-0777. A string is read as "
            "octal ('0600')."
        ),
    )


class MetricsConfig(StrictModel):
    """Prometheus metrics endpoint."""

    address: Annotated[str, AfterValidator(_check_listen_address)] | None = Field(
        None,
        description=(
            "IP:PORT the metrics endpoint listens on, such as 127.0.0.1:9464 or "
            "[::1]:9464. None turns the endpoint off."
        ),
    )

    def endpoint(self) -> tuple[str, int] | None:
        """Return (host, port) to listen on, with no brackets, or None when off."""
        if self.address is None:
            return None
        return _split_listen_address(self.address)


class LoggingConfig(StrictModel):
    """Log output of the daemon."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level of the messages logged."
    )
    format: Literal["text", "json"] = Field(
        "text", description="'text' for one line per message, 'json' for JSON lines."
    )


class ShieldConfig(StrictModel):
    """Settings of the shield daemon in gateway or sidecar mode."""

    mode: Literal["gateway", "sidecar"] = Field(
        ...,
        description=(
            "'gateway' matches forwarded packets (FORWARD chain) in a router or "
            "bridge namespace; 'sidecar' matches packets to the local namespace "
            "(INPUT chain) inside a pod."
        ),
    )
    netns: Annotated[str, AfterValidator(_check_netns_name)] | None = Field(
        None,
        description=(
            "Network namespace name under /run/netns to run in. None runs in the "
            "namespace the daemon starts in."
        ),
    )
    scopes: list[ScopeConfig] = Field(
        ...,
        min_length=1,
        description=(
            "Traffic the shield answers for, with unique names and no flow "
            "matched by two scopes."
        ),
    )
    queues: QueueConfig = Field(
        default_factory=QueueConfig, description="NFQUEUE queue numbers."
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Memory and rate limits."
    )
    window: WindowConfig = Field(
        default_factory=WindowConfig, description="Receive window policy."
    )
    timestamps: TimestampConfig = Field(
        default_factory=TimestampConfig, description="TCP timestamp policy."
    )
    freeze: FreezeConfig = Field(
        default_factory=FreezeConfig, description="Freeze length limit."
    )
    control: ControlConfig = Field(
        default_factory=ControlConfig, description="Control socket."
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="Prometheus metrics endpoint."
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="Log output."
    )
    state_dir: Annotated[Path, AfterValidator(_check_absolute)] = Field(
        Path("/var/lib/shieldproxy"),
        description=(
            "Absolute path of the directory that holds the journals of frozen "
            "scopes, and frozen flows saved on shutdown."
        ),
    )
    durability: Literal["journal", "memory"] = Field(
        "journal",
        description=(
            "'journal' writes every acknowledged byte to a journal in state_dir "
            "and flushes it to disk before the ACK is sent, so a crash loses "
            "nothing. 'memory' keeps the bytes in memory only and saves them on "
            "SIGTERM; it sends ACKs sooner, but a crash loses what the shield "
            "acknowledged."
        ),
    )

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, scopes: list[ScopeConfig]) -> list[ScopeConfig]:
        names = [scope.name for scope in scopes]
        for name in names:
            if names.count(name) > 1:
                raise PydanticCustomError(
                    "duplicate_scope",
                    "Scope name '{name}' is used more than once. Give each scope "
                    "its own name",
                    {"name": name},
                )
        for index, first in enumerate(scopes):
            for second in scopes[index + 1 :]:
                _check_disjoint(first, second)
        return scopes

    @property
    def hook(self) -> Hook:
        """iptables chain the rules hook into, FORWARD (gateway) or INPUT (sidecar)."""
        return "FORWARD" if self.mode == "gateway" else "INPUT"

    def scope(self, name: str) -> ScopeConfig:
        """Return the scope called NAME.

        Raises:
            KeyError: no scope has that name. The message lists the known names.
        """
        for scope in self.scopes:
            if scope.name == name:
                return scope
        known = ", ".join(scope.name for scope in self.scopes)
        raise KeyError(f"scope '{name}' not found. Configured scopes: {known}")

    def rule_scopes(self, name: str) -> list[Scope]:
        """Expand scope NAME into one rule scope per address and port.

        A scope with no ports gives one rule scope per address, matching every
        port. Raises KeyError like :meth:`scope`.
        """
        config = self.scope(name)
        ports: list[int | None] = list(config.ports) or [None]
        return [
            Scope(address=address, port=port, in_interface=config.interface)
            for address in config.addresses
            for port in ports
        ]

    def flow_limits(self) -> FlowLimits:
        """Return the per-flow limits for the shield's flows."""
        return FlowLimits(
            max_buffer_bytes=self.limits.per_flow_buffer_bytes,
            challenge_acks_per_s=self.limits.challenge_acks_per_s,
        )

    def trickle_policy(self) -> TricklePolicy | None:
        """Return the trickle policy, or None with the 'hold' window policy."""
        if self.window.policy != "trickle":
            return None
        return TricklePolicy(
            step_bytes=self.window.trickle_step_bytes,
            interval_s=self.window.trickle_interval_s,
        )


def _check_disjoint(first: ScopeConfig, second: ScopeConfig) -> None:
    """Raise unless no TCP flow matches both scopes.

    The interface is ignored, so scopes on different interfaces with overlapping
    addresses and ports still overlap.
    """
    if first.ports and second.ports:
        shared_ports = sorted(set(first.ports) & set(second.ports))
        if not shared_ports:
            return
    else:
        shared_ports = sorted(first.ports or second.ports)
    if shared_ports:
        ports_text = "port " + ", ".join(map(str, shared_ports))
    else:
        ports_text = "every port"
    for first_text in first.addresses:
        first_network = ipaddress.ip_network(first_text)
        for second_text in second.addresses:
            second_network = ipaddress.ip_network(second_text)
            if first_network.version != second_network.version:
                continue
            if first_network.overlaps(second_network):
                raise PydanticCustomError(
                    "overlapping_scopes",
                    "Scopes '{first}' and '{second}' overlap: {first_net} and "
                    "{second_net} share addresses and both match {ports}. Give "
                    "each address and port to one scope only",
                    {
                        "first": first.name,
                        "second": second.name,
                        "first_net": first_text,
                        "second_net": second_text,
                        "ports": ports_text,
                    },
                )
