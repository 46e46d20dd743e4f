import logging
import math
import urllib.request

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shieldproxy.metrics import ShieldMetrics
from shieldproxy.tcp.flow import FlowLimits, ShieldFlow
from shieldproxy.tcp.segment import ACK, PSH, RST, SYN, Segment, TcpOptions
from shieldproxy.tcp.seq import seq_add
from shieldproxy.tcp.snapshot import FlowKey, FlowSnapshot

KEY = FlowKey.create("198.18.2.2", 5001, "198.18.1.2", 40000)
OTHER_KEY = FlowKey.create("198.18.2.2", 5001, "198.18.1.2", 40001)
RCV_NXT = 2**32 - 1000
SND_NXT = 7000
TSVAL = 100_000
TS_RECENT = 1000


def make_flow(key=KEY, *, window=8192, limits=None):
    snapshot = FlowSnapshot(
        key=key,
        rcv_nxt=RCV_NXT,
        rcv_wup=RCV_NXT,
        rcv_wnd=window,
        snd_una=SND_NXT,
        snd_nxt=SND_NXT,
        rcv_wscale=0,
        snd_wscale=7,
        mss=1460,
        sack_ok=True,
        timestamps_ok=True,
        tsval=TSVAL,
        taken_at=10.0,
        ts_recent=TS_RECENT,
    )
    return ShieldFlow(snapshot, limits=limits or FlowLimits())


def peer(key, offset, payload=b"", *, flags=ACK, tsval=2000, ack=SND_NXT):
    return Segment(
        version=4,
        src=key.peer_addr,
        dst=key.container_addr,
        sport=key.peer_port,
        dport=key.container_port,
        seq=seq_add(RCV_NXT, offset),
        ack=ack,
        flags=flags,
        window=1000,
        options=TcpOptions(timestamp=(tsval, TSVAL)),
        payload=payload,
    )


def scraped(metrics):
    """Parse one render() into {(sample name, sorted label items): value}."""
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels):
    return samples[name, tuple(sorted(labels.items()))]


def counter_samples(samples):
    return {
        key: number
        for key, number in samples.items()
        if key[0].endswith("_total") and key[0].startswith("shieldproxy_")
    }


def test_live_flow_counters_rendered():
    metrics = ShieldMetrics()
    flow = make_flow()
    flow.receive(peer(KEY, 0, b"a" * 1000), now=10.5)
    metrics.sample({"web": ("frozen", [flow])}, {})
    samples = scraped(metrics)
    assert value(samples, "shieldproxy_absorbed_bytes_total", scope="web") == 1000
    assert value(samples, "shieldproxy_acks_sent_total", scope="web") == 1
    assert value(samples, "shieldproxy_handed_over_bytes_total", scope="web") == 0
    assert value(samples, "shieldproxy_flows", scope="web", state="shielding") == 1
    assert value(samples, "shieldproxy_flows", scope="web", state="handed-over") == 0
    assert value(samples, "shieldproxy_buffer_bytes", scope="web") == 1000
    assert value(samples, "shieldproxy_scope_frozen", scope="web") == 1


def test_live_counters_follow_samples():
    metrics = ShieldMetrics()
    flow = make_flow()
    flow.receive(peer(KEY, 0, b"a" * 1000), now=10.5)
    metrics.sample({"web": ("frozen", [flow])}, {})
    flow.receive(peer(KEY, 1000, b"b" * 500), now=10.6)
    before = scraped(metrics)
    metrics.sample({"web": ("frozen", [flow])}, {})
    after = scraped(metrics)
    assert value(before, "shieldproxy_absorbed_bytes_total", scope="web") == 1000
    assert value(after, "shieldproxy_absorbed_bytes_total", scope="web") == 1500


def test_counters_monotonic_across_release():
    metrics = ShieldMetrics()
    flow = make_flow()
    other = make_flow(OTHER_KEY)
    flow.receive(peer(KEY, 0, b"a" * 1000), now=10.5)
    other.receive(peer(OTHER_KEY, 0, b"c" * 300), now=10.5)
    metrics.sample({"web": ("frozen", [flow, other])}, {})
    while_live = scraped(metrics)

    # Bytes received after the last sample still count once the flow is released.
    flow.receive(peer(KEY, 1000, b"b" * 500), now=10.6)
    handover, _ = flow.handover(now=11.0)
    metrics.flow_released("web", flow.stats, len(handover.data))
    after_release = scraped(metrics)
    metrics.sample({"web": ("handed-over", [other])}, {})
    after_sample = scraped(metrics)

    for key, before in counter_samples(while_live).items():
        assert after_release[key] >= before, key
        assert after_sample[key] >= after_release[key], key
    absorbed = "shieldproxy_absorbed_bytes_total"
    assert value(after_release, absorbed, scope="web") == 1800
    assert value(after_sample, absorbed, scope="web") == 1800
    handed_over = "shieldproxy_handed_over_bytes_total"
    assert value(after_release, handed_over, scope="web") == 1500
    assert value(after_release, "shieldproxy_acks_sent_total", scope="web") == (
        flow.stats.acks_sent + other.stats.acks_sent
    )


def test_unsampled_flow_counted_on_release():
    metrics = ShieldMetrics()
    flow = make_flow()
    flow.receive(peer(KEY, 0, b"a" * 700), now=10.5)
    metrics.flow_released("web", flow.stats, 700)
    samples = scraped(metrics)
    assert value(samples, "shieldproxy_absorbed_bytes_total", scope="web") == 700
    assert value(samples, "shieldproxy_handed_over_bytes_total", scope="web") == 700


def test_flow_missing_release_keeps_counters(caplog):
    metrics = ShieldMetrics()
    flow = make_flow()
    flow.receive(peer(KEY, 0, b"a" * 1000), now=10.5)
    metrics.sample({"web": ("frozen", [flow])}, {})
    flow.receive(peer(KEY, 1000, b"b" * 200), now=10.6)
    with caplog.at_level(logging.WARNING, logger="shieldproxy.metrics"):
        metrics.sample({"web": ("idle", [])}, {})
    samples = scraped(metrics)
    assert value(samples, "shieldproxy_absorbed_bytes_total", scope="web") == 1200
    assert value(samples, "shieldproxy_flows", scope="web", state="shielding") == 0
    assert "without flow_released()" in caplog.text
    assert str(KEY) in caplog.text


def test_gauges_zero_after_release():
    metrics = ShieldMetrics()
    flow = make_flow()
    flow.receive(peer(KEY, 0, b"a" * 1000), now=10.5)
    handover, _ = flow.handover(now=11.0)
    metrics.sample({"web": ("handed-over", [flow])}, {})
    handed_over = scraped(metrics)
    assert (
        value(handed_over, "shieldproxy_flows", scope="web", state="handed-over") == 1
    )
    assert value(handed_over, "shieldproxy_flows", scope="web", state="shielding") == 0
    assert value(handed_over, "shieldproxy_scope_frozen", scope="web") == 1

    metrics.flow_released("web", flow.stats, len(handover.data))
    released = scraped(metrics)
    for state in ("shielding", "handed-over", "reset"):
        assert value(released, "shieldproxy_flows", scope="web", state=state) == 0
    assert value(released, "shieldproxy_buffer_bytes", scope="web") == 0

    metrics.sample({"web": ("idle", [])}, {})
    idle = scraped(metrics)
    assert value(idle, "shieldproxy_scope_frozen", scope="web") == 0
    assert value(idle, "shieldproxy_buffer_bytes", scope="web") == 0


def test_freeze_histogram_counts_freezes():
    metrics = ShieldMetrics()
    metrics.freeze_ended("web", 3.0)
    metrics.freeze_ended("web", 700.0)
    samples = scraped(metrics)
    name = "shieldproxy_freeze_duration_seconds"
    assert value(samples, name + "_count", scope="web") == 2
    assert value(samples, name + "_sum", scope="web") == 703.0
    assert value(samples, name + "_bucket", scope="web", le="2.0") == 0
    assert value(samples, name + "_bucket", scope="web", le="5.0") == 1
    assert value(samples, name + "_bucket", scope="web", le="600.0") == 1
    assert value(samples, name + "_bucket", scope="web", le="1800.0") == 2
    assert value(samples, name + "_bucket", scope="web", le="+Inf") == 2


def test_freeze_histogram_present_before_first_freeze():
    metrics = ShieldMetrics()
    metrics.sample({"web": ("idle", [])}, {})
    samples = scraped(metrics)
    name = "shieldproxy_freeze_duration_seconds_count"
    assert value(samples, name, scope="web") == 0


@pytest.mark.parametrize("duration", [-1.0, math.nan, math.inf])
def test_freeze_ended_rejects_invalid_duration(duration):
    metrics = ShieldMetrics()
    with pytest.raises(ValueError, match="invalid freeze duration"):
        metrics.freeze_ended("web", duration)


def test_flow_released_rejects_negative_bytes():
    metrics = ShieldMetrics()
    with pytest.raises(ValueError, match="invalid handed_over_bytes"):
        metrics.flow_released("web", make_flow().stats, -1)


def test_drop_reasons_labelled():
    metrics = ShieldMetrics()
    flow = make_flow(limits=FlowLimits(challenge_acks_per_s=1))
    # Each reason gets a different count, so swapped labels fail.
    flow.receive(peer(KEY, 0, b"p", tsval=TS_RECENT - 1), now=10.1)
    for _ in range(2):
        flow.receive(peer(KEY, 50_000, flags=RST), now=10.2)
    for _ in range(3):
        flow.receive(peer(KEY, 0, b"n", flags=PSH), now=10.3)
    for _ in range(4):
        flow.receive(peer(KEY, 0, b"b", ack=SND_NXT + 100), now=10.4)
    for _ in range(6):
        flow.receive(peer(KEY, 5, flags=SYN | ACK), now=10.5)
    flow.receive(peer(KEY, 0, b"x" * 9000), now=10.6)
    assert flow.stats.challenge_acks == 1
    metrics.sample({"web": ("frozen", [flow])}, {"malformed": 3, "held-limit": 2})
    samples = scraped(metrics)
    dropped = "shieldproxy_dropped_segments_total"
    assert value(samples, dropped, reason="paws") == 1
    assert value(samples, dropped, reason="rst-out-of-window") == 2
    assert value(samples, dropped, reason="no-ack-flag") == 3
    assert value(samples, dropped, reason="bad-ack") == 4
    assert value(samples, dropped, reason="challenge-limit") == 5
    assert value(samples, dropped, reason="malformed") == 3
    assert value(samples, dropped, reason="held-limit") == 2
    beyond_edge = value(
        samples, "shieldproxy_dropped_bytes_total", reason="beyond-edge"
    )
    assert beyond_edge == 9000 - 8192


def test_drop_reasons_present_at_zero():
    samples = scraped(ShieldMetrics())
    dropped = "shieldproxy_dropped_segments_total"
    for reason in ("malformed", "held-limit", "paws", "bad-ack"):
        assert value(samples, dropped, reason=reason) == 0


def test_instances_use_private_registries():
    first = ShieldMetrics()
    second = ShieldMetrics()
    flow = make_flow()
    flow.receive(peer(KEY, 0, b"a" * 1000), now=10.5)
    first.sample({"web": ("frozen", [flow])}, {})
    assert b'scope="web"' in first.render()
    assert b'scope="web"' not in second.render()
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    assert b"shieldproxy_" not in default


def test_http_scrape_on_loopback():
    metrics = ShieldMetrics()
    metrics.start_http(("127.0.0.1", 0))
    try:
        port = metrics.http_port
        if port is None:
            pytest.skip("this prometheus-client does not return its HTTP server")
        flow = make_flow()
        flow.receive(peer(KEY, 0, b"a" * 1000), now=10.5)
        metrics.sample({"web": ("frozen", [flow])}, {})
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.close()
    assert 'shieldproxy_absorbed_bytes_total{scope="web"} 1000.0' in body
    assert metrics.http_port is None


def test_start_http_twice_rejected():
    metrics = ShieldMetrics()
    metrics.start_http(("127.0.0.1", 0))
    try:
        with pytest.raises(RuntimeError, match="already running"):
            metrics.start_http(("127.0.0.1", 0))
    finally:
        metrics.close()
