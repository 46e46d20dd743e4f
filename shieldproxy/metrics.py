"""Prometheus metrics of the shield daemon.

A custom collector builds each counter at scrape time as the totals of released
flows plus the last sampled values of live flows. ``flow_released()`` moves a
flow's final values from the live part to the released part under one lock, and a
flow's own counters only grow, so no exposed counter goes down. The scrape thread
reads only numbers that ``sample()`` copied on the daemon's thread, so a scrape
shows live flows as of the last ``sample()`` call.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .shield import DROP_REASONS
from .tcp.flow import FlowState, FlowStats, ShieldFlow
from .tcp.snapshot import FlowKey

log = logging.getLogger(__name__)

FREEZE_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
"""Histogram buckets for freezes, from a short pause to a one-hour checkpoint."""

SEGMENT_DROP_FIELDS = {
    "paws": "paws_rejected",
    "rst-out-of-window": "rst_ignored",
    "no-ack-flag": "no_ack_flag",
    "bad-ack": "bad_ack_field",
    "challenge-limit": "challenge_acks_suppressed",
}
"""Drop reason label of each per-flow FlowStats field counted as a dropped segment."""

ENGINE_DROP_REASONS = DROP_REASONS
"""Keys of ``Shield.counters.dropped``, exposed at zero before the first drop."""

FROZEN_SCOPE_STATES = frozenset({"frozen", "handed-over"})
"""Scope states for which ``shieldproxy_scope_frozen`` is 1."""

FLOW_STATES = tuple(state.value for state in FlowState)


@dataclass(frozen=True)
class _FlowCounts:
    """Counter values read from one flow's FlowStats."""

    absorbed_bytes: int
    acks_sent: int
    beyond_edge_bytes: int
    after_fin_bytes: int
    dropped_segments: tuple[tuple[str, int], ...]

    @classmethod
    def read(cls, stats: FlowStats) -> _FlowCounts:
        return cls(
            absorbed_bytes=stats.bytes_absorbed,
            acks_sent=stats.acks_sent,
            beyond_edge_bytes=stats.bytes_beyond_edge,
            after_fin_bytes=stats.bytes_after_fin,
            dropped_segments=tuple(
                (reason, getattr(stats, name))
                for reason, name in SEGMENT_DROP_FIELDS.items()
            ),
        )


@dataclass(frozen=True)
class _LiveFlow:
    """Values of a live flow, copied by the last sample()."""

    scope: str
    key: FlowKey
    stats: FlowStats
    """The flow's own stats object, kept to match flow_released() calls by identity."""
    counts: _FlowCounts
    state: str
    buffered_bytes: int


@dataclass
class _Totals:
    """Counter totals: per scope for bytes and ACKs, per reason for drops."""

    absorbed_bytes: Counter[str]
    handed_over_bytes: Counter[str]
    acks_sent: Counter[str]
    dropped_segments: Counter[str]
    dropped_bytes: Counter[str]

    @classmethod
    def empty(cls) -> _Totals:
        return cls(Counter(), Counter(), Counter(), Counter(), Counter())

    def copy(self) -> _Totals:
        return _Totals(
            Counter(self.absorbed_bytes),
            Counter(self.handed_over_bytes),
            Counter(self.acks_sent),
            Counter(self.dropped_segments),
            Counter(self.dropped_bytes),
        )

    def add(self, scope: str, counts: _FlowCounts) -> None:
        self.absorbed_bytes[scope] += counts.absorbed_bytes
        self.acks_sent[scope] += counts.acks_sent
        self.dropped_bytes["beyond-edge"] += counts.beyond_edge_bytes
        self.dropped_bytes["after-fin"] += counts.after_fin_bytes
        for reason, count in counts.dropped_segments:
            self.dropped_segments[reason] += count


class _ShieldCollector(Collector):
    """Collector of the counter and gauge families of a :class:`ShieldMetrics`."""

    def __init__(self, metrics: ShieldMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Named families let the registry reject a name clash at register().
        return self._families(_Totals.empty(), {}, [])

    def collect(self) -> Iterable[Metric]:
        totals, scope_states, live = self._metrics._read_state()
        return self._families(totals, scope_states, live)

    def _families(
        self, totals: _Totals, scope_states: dict[str, str], live: list[_LiveFlow]
    ) -> Iterator[Metric]:
        scopes = sorted(
            set(scope_states)
            | set(totals.absorbed_bytes)
            | set(totals.handed_over_bytes)
            | {flow.scope for flow in live}
        )

        absorbed = CounterMetricFamily(
            "shieldproxy_absorbed_bytes",
            "Payload bytes the shield accepted from peers in the containers' name.",
            labels=["scope"],
        )
        handed_over = CounterMetricFamily(
            "shieldproxy_handed_over_bytes",
            "Bytes handed to restored sockets, counted when their flows are released.",
            labels=["scope"],
        )
        acks = CounterMetricFamily(
            "shieldproxy_acks_sent",
            "ACK segments the shield sent to peers in the containers' name.",
            labels=["scope"],
        )
        for scope in scopes:
            absorbed.add_metric([scope], totals.absorbed_bytes[scope])
            handed_over.add_metric([scope], totals.handed_over_bytes[scope])
            acks.add_metric([scope], totals.acks_sent[scope])
        yield absorbed
        yield handed_over
        yield acks

        dropped_segments = CounterMetricFamily(
            "shieldproxy_dropped_segments",
            "Peer segments whose content the shield did not take, by reason.",
            labels=["reason"],
        )
        reasons = set(SEGMENT_DROP_FIELDS) | set(totals.dropped_segments)
        for reason in sorted(reasons):
            dropped_segments.add_metric([reason], totals.dropped_segments[reason])
        yield dropped_segments

        dropped_bytes = CounterMetricFamily(
            "shieldproxy_dropped_bytes",
            "Peer payload bytes the shield dropped, by reason.",
            labels=["reason"],
        )
        for reason in ("after-fin", "beyond-edge"):
            dropped_bytes.add_metric([reason], totals.dropped_bytes[reason])
        yield dropped_bytes

        flows: Counter[tuple[str, str]] = Counter()
        buffered: Counter[str] = Counter()
        for flow in live:
            flows[flow.scope, flow.state] += 1
            buffered[flow.scope] += flow.buffered_bytes
        flow_gauge = GaugeMetricFamily(
            "shieldproxy_flows",
            "Flows the shield currently holds, by flow state.",
            labels=["scope", "state"],
        )
        buffer_gauge = GaugeMetricFamily(
            "shieldproxy_buffer_bytes",
            "Payload bytes the shield currently buffers for restored sockets.",
            labels=["scope"],
        )
        frozen_gauge = GaugeMetricFamily(
            "shieldproxy_scope_frozen",
            "1 while a scope is frozen or handed over, 0 while it is idle.",
            labels=["scope"],
        )
        for scope in scopes:
            for state in FLOW_STATES:
                flow_gauge.add_metric([scope, state], flows[scope, state])
            buffer_gauge.add_metric([scope], buffered[scope])
            frozen = scope_states.get(scope) in FROZEN_SCOPE_STATES
            frozen_gauge.add_metric([scope], 1 if frozen else 0)
        yield flow_gauge
        yield buffer_gauge
        yield frozen_gauge


class ShieldMetrics:
    """Prometheus metrics of one daemon, in a registry of their own.

    Call :meth:`sample` from the daemon's thread, periodically and after each
    freeze, thaw and release. Call :meth:`flow_released` for every flow when it
    leaves the shield engine, before the next :meth:`sample`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._released = _Totals.empty()
        self._live: dict[int, _LiveFlow] = {}
        self._scope_states: dict[str, str] = {}
        self._engine_dropped: dict[str, int] = {}
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._http_started = False
        self._freeze_duration = Histogram(
            "shieldproxy_freeze_duration_seconds",
            "Time from a scope's freeze to its release, in seconds.",
            ["scope"],
            buckets=FREEZE_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_ShieldCollector(self))

    # events

    def flow_released(
        self, scope: str, stats: FlowStats, handed_over_bytes: int
    ) -> None:
        """Add a flow's final counters to the released totals of SCOPE.

        Call it once per flow, when the flow leaves the shield engine.
        ``handed_over_bytes`` is the length of the data its restored socket received.
        """
        if handed_over_bytes < 0:
            raise ValueError(
                f"invalid handed_over_bytes {handed_over_bytes}: expected 0 or more"
            )
        counts = _FlowCounts.read(stats)
        with self._lock:
            self._live.pop(id(stats), None)
            self._released.add(scope, counts)
            self._released.handed_over_bytes[scope] += handed_over_bytes

    def freeze_ended(self, scope: str, duration_s: float) -> None:
        """Record the duration of one freeze of SCOPE in the histogram."""
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(
                f"invalid freeze duration {duration_s!r}: expected a finite "
                "number of seconds >= 0"
            )
        self._freeze_duration.labels(scope).observe(duration_s)

    def sample(
        self,
        scopes: Mapping[str, tuple[str, Iterable[ShieldFlow]]],
        engine_dropped: Mapping[str, int],
    ) -> None:
        """Copy the live flows' counters and the scopes' states for the next scrape.

        ``scopes`` maps each scope name to its state (idle, frozen or
        handed-over) and the flows the shield engine still holds for it.
        ``engine_dropped`` is ``Shield.counters.dropped``.
        """
        live: dict[int, _LiveFlow] = {}
        for scope, (_, flows) in scopes.items():
            for flow in flows:
                live[id(flow.stats)] = _LiveFlow(
                    scope=scope,
                    key=flow.key,
                    stats=flow.stats,
                    counts=_FlowCounts.read(flow.stats),
                    state=flow.state.value,
                    buffered_bytes=flow.buffered_bytes,
                )
        with self._lock:
            vanished = [entry for key, entry in self._live.items() if key not in live]
            for entry in vanished:
                # Keep the counters monotonic even if the daemon missed a release.
                self._released.add(entry.scope, _FlowCounts.read(entry.stats))
            self._live = live
            self._scope_states = {name: state for name, (state, _) in scopes.items()}
            self._engine_dropped = dict(engine_dropped)
        if vanished:
            log.warning(
                "metrics: %d flows left the shield without flow_released(), such "
                "as %s; their counters were added to the released totals",
                len(vanished),
                ", ".join(str(entry.key) for entry in vanished[:3]),
            )
        for scope in scopes:
            # Create the histogram series of each scope, so they show 0 before a freeze.
            self._freeze_duration.labels(scope)

    def _read_state(self) -> tuple[_Totals, dict[str, str], list[_LiveFlow]]:
        """Return the counter totals, scope states and live flows for one scrape."""
        with self._lock:
            totals = self._released.copy()
            live = list(self._live.values())
            scope_states = dict(self._scope_states)
            engine_dropped = dict(self._engine_dropped)
        for flow in live:
            totals.add(flow.scope, flow.counts)
        for reason in ENGINE_DROP_REASONS:
            totals.dropped_segments[reason] += 0
        for reason, count in engine_dropped.items():
            totals.dropped_segments[reason] += count
        return totals, scope_states, live

    # exposition

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def start_http(self, endpoint: tuple[str, int]) -> None:
        """Serve the metrics over HTTP at (host, port) from a daemon thread.

        Port 0 picks a free port, which :attr:`http_port` then returns.
        """
        if self._http_started:
            raise RuntimeError("the metrics HTTP server is already running")
        host, port = endpoint
        try:
            started: object = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"metrics endpoint {host}:{port} failed to listen: {exc.strerror}",
            ) from exc
        self._http_started = True
        # prometheus-client 0.20 and later return (server, thread). Versions 0.17
        # to 0.19 return None, so http_port and close() cannot reach the server.
        if isinstance(started, tuple):
            self._server, self._server_thread = started
        log.info("metrics endpoint listening on %s:%s", host, self.http_port or port)

    @property
    def http_port(self) -> int | None:
        """Port the HTTP server listens on, or None if unknown or not started."""
        if self._server is None:
            return None
        return self._server.server_port

    def close(self) -> None:
        """Stop the HTTP server if one runs and this prometheus-client can stop it."""
        server, thread = self._server, self._server_thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        self._server = None
        self._server_thread = None
        self._http_started = False
