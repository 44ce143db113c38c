"""The latency chart: one line per model and engine, on logarithmic axes, checked point by point."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

from mmkd.reports import latency_plot_svg

SVG = "{http://www.w3.org/2000/svg}"


def rows(model, engine, latencies):
    return [{"model": model, "engine": engine, "batch_size": b, "p50_ms": ms} for b, ms in latencies.items()]


def test_each_series_is_a_line_through_its_points():
    # Latencies between 0.1 ms and 100 ms: the y axis spans 10^-1 .. 10^2, three decades.
    data = rows("student", "onnxruntime", {1: 0.1, 8: 1.0, 32: 10.0, 128: 100.0}) + \
        rows("student", "pytorch-eager", {1: 1.0, 8: 2.0, 32: 4.0, 128: 8.0})
    root = ElementTree.fromstring(latency_plot_svg(data))
    lines = {line.get("data-series"): line.get("points") for line in root.iter(f"{SVG}polyline")}
    assert set(lines) == {"student / onnxruntime", "student / pytorch-eager"}

    points = [tuple(map(float, pair.split(","))) for pair in lines["student / onnxruntime"].split()]
    # x: log2(batch) from 0 to 7 across 520 units starting at 70; y: log10(ms) from -1 to 2 across 320 units from 350 up.
    expected = [(70 + 520 * k / 7, 350 - 320 * (d + 1) / 3) for k, d in ((0, -1), (3, 0), (5, 1), (7, 2))]
    assert points == [(round(x, 1), round(y, 1)) for x, y in expected]

    labels = [text.text for text in root.iter(f"{SVG}text")]
    for label in ("1", "8", "32", "128", "0.1", "1", "10", "100", "batch size", "p50 latency, ms"):
        assert label in labels


def test_time_calls_stops_at_budget():
    import time

    from mmkd.benchmarking import time_calls

    # Each call takes at least 20 ms, so 0.1 s of timing ends after five to eight calls.
    timed = time_calls(lambda: time.sleep(0.02), warmup=0, iterations=100, max_seconds=0.1)
    assert 5 <= len(timed) <= 8
    assert (timed >= 20.0).all()
    # A budget smaller than one call still times five.
    assert len(time_calls(lambda: time.sleep(0.02), warmup=0, iterations=100, max_seconds=0.001)) == 5


def test_resident_peak_sees_a_temporary_allocation():
    import numpy as np

    from mmkd.benchmarking import ResidentPeak

    with ResidentPeak() as peak:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched, then freed
        del block
    assert peak.mib is not None
    assert 60 <= peak.mib <= 80

    with ResidentPeak() as quiet:
        pass
    assert quiet.mib < 5
