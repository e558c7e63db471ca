"""bench/paper.py (the package `dapdee.bench.paperbench`) end to end at its smallest size
(`--smoke`: AlexNet, 4G, 2 frames per plan, all six planners, tiny sweeps, its Fig. 7 on a
second device tier at K = 30, adaptation) through the real planner and edge worker processes and
the device runtime; then a rerun that must take every cell from the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dapdee.bench.paperbench.scoring import adaptation_lines

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "artifacts" / "fmnist-alexnet"
PLANNERS = ("device-only", "edge-only", "neurosurgeon", "dads", "edgent", "dapdee")


def _run(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "paper.py"), "--smoke", "--quiet", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )


def _check_cells(res: dict) -> None:
    assert len(res["light"]) == 1 and len(res["heavy"]) == 1
    for kind, metric in (("light", "median_ms"), ("heavy", "throughput_fps")):
        cell = res[kind][0]
        assert set(cell["planners"]) == set(PLANNERS)
        for name in PLANNERS:
            v = cell["planners"][name]
            assert v["frames"] >= 1, (kind, name)
            assert v[metric] is not None and v[metric] > 0, (kind, name)
            assert v["plan"]["predicted"]["latency_ms"] > 0
            assert v["where"]["fallback"] == 0, (kind, name, v["errors"])
            # the smoke variant's tie-break ratio is 1: a third round whenever the first two differ,
            # and a heavy plan's throughput is then the middle round's
            field = "round_median_ms" if kind == "light" else "round_throughput_fps"
            first, second, *third = v[field]
            assert len(third) == (first != second), (kind, name, v[field])
            if kind == "heavy":
                want = sorted(v[field])[1] if third else (first + second) / 2
                assert v["throughput_fps"] == pytest.approx(want), (name, v[field])
            # every plan came from the planner service: the baselines' from POST /plan {"baseline": NAME}
            assert v["plan"]["planner"] == name
            # each process's CPU a frame took over the rounds: the device's always some (it runs the
            # requests, when not the compute); the edge worker's read at /proc's tick resolution
            terms = v["terms_ms"]
            assert terms["device_cpu_ms"] > 0, (kind, name, terms)
            assert terms["edge_cpu_ms"] is not None and terms["edge_cpu_ms"] >= 0, (kind, name, terms)
    # DAPDEE's plan is never predicted worse than a baseline's (exact under the cost model)
    light, heavy = res["light"][0]["planners"], res["heavy"][0]["planners"]
    for name in PLANNERS:
        assert light["dapdee"]["plan"]["predicted"]["latency_ms"] <= light[name]["plan"]["predicted"]["latency_ms"] * (
            1 + 1e-9
        )
        assert heavy["dapdee"]["plan"]["predicted"]["bottleneck_ms"] <= heavy[name]["plan"]["predicted"][
            "bottleneck_ms"
        ] * (1 + 1e-9)


def _check_v2_and_sweeps(res: dict) -> None:
    light = res["light"][0]
    # every planner prices plans with the round trip the device runtime sensed (the shaped 20 ms
    # plus the fixed per-request cost its probe pairs measure): a lower bound only
    rtt = light["request"]["rtt_ms"]
    assert rtt > 20.0 and res["heavy"][0]["request"]["rtt_ms"] == rtt
    # cost model v2: both per-request costs measured, published and priced (an Edge-Only plan's
    # device stage is the device's per-request cost alone)
    ov = light["overheads"]
    assert ov["device_request_ms"] > 0 and ov["edge_request_ms"] > 0
    # and the worker's calibration of its timings to whole frames, within its clamp
    assert 0.5 <= ov["edge_calibration"]["calibration"] <= 4.0, ov
    edge_only = light["planners"]["edge-only"]["plan"]
    assert edge_only["predicted"]["device_ms"] == pytest.approx(ov["device_request_ms"], rel=1e-6)
    # the graph takes raw uint8 frames: an Edge-Only plan ships 1 byte per input pixel
    assert edge_only["bytes"] == 32 * 32 and edge_only["kind"] == "edge-only"
    assert res["fig6"] and res["adaptation"]["frames"]
    # Fig. 7 on its own device tier (K = 30), with the Device-Only and Edge-Only predictions beside each cut
    (fig7,) = res["fig7"]
    assert fig7["slowdown"] == 30.0 and fig7["tier"] == "device-k30"
    for p in fig7["points"]:
        assert p["median_ms"] > 0 and p["plan"]["kind"] in ("device-only", "edge-only", "mid")
        best_baseline = min(p["device_only"]["latency_ms"], p["edge_only"]["latency_ms"])
        assert p["plan"]["predicted"]["latency_ms"] <= best_baseline * (1 + 1e-9)
    dev10 = res["light"][0]["planners"]["device-only"]["plan"]["predicted"]["latency_ms"]
    assert fig7["budget_ms"] > 1.5 * dev10  # the K = 30 device is slower than the K = 10 one


def _check_report(doc: dict, md: str) -> None:
    assert doc["setup"]["slowdown"] == 10.0
    assert "K = 10" in md and "K = 30" in md
    assert "edge calibration x" in md
    assert "| CPU ms per frame: device / edge |" in md
    # every target has its line, PASS or FAIL as the JSON says, and the tally counts them
    lines = md.splitlines()
    assert doc["targets"] and all(t["what"] for t in doc["targets"])
    for t in doc["targets"]:
        want = f"{'PASS' if t['pass'] else 'FAIL'}  {t['what']}:"
        assert any(line.startswith(want) for line in lines), want
    required = [t for t in doc["targets"] if not t.get("info")]
    n_pass = sum(bool(t["pass"]) for t in required)
    assert f"{n_pass} PASS, {len(required) - n_pass} FAIL of the required" in md
    # fidelity lines: the sequential median and one measured / predicted throughput per heavy plan
    fid = [t for t in doc["targets"] if t["group"] == "fidelity"]
    heavy_plans = doc["throughput_fidelity"]["plans"]
    assert heavy_plans >= 2 and len(fid) == 1 + heavy_plans
    assert all(t["ratio"] > 0 for t in fid)


@pytest.mark.skipif(not (ARTIFACT / "manifest.json").is_file(), reason="artifacts/fmnist-alexnet missing")
def test_paper_bench_smoke_end_to_end_and_resumable(tmp_path: Path) -> None:
    p = _run(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in (
        "paper.json",
        "paper.md",
        "paper_cells.json",
        "paper_light_latency.png",
        "paper_heavy_throughput.png",
        "paper_fig7_bandwidth.png",
        "paper_adaptation.png",
    ):
        assert (tmp_path / name).is_file(), name
    doc = json.loads((tmp_path / "paper.json").read_text())
    res = doc["results"]
    _check_cells(res)
    _check_v2_and_sweeps(res)
    _check_report(doc, (tmp_path / "paper.md").read_text())
    cells = json.loads((tmp_path / "paper_cells.json").read_text())["cells"]
    assert len(cells) == doc["cells_measured"] >= 5

    # resumable: everything cached (no cell measured, so no services started), same numbers
    p2 = _run(tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    doc2 = json.loads((tmp_path / "paper.json").read_text())
    assert doc2["cells_measured"] == 0 and doc2["cells_cached"] == len(cells)
    assert doc2["results"]["light"] == res["light"]


@pytest.mark.parametrize("inflight", [1, 2, 6])
@pytest.mark.parametrize("clustered", [False, True])
def test_steady_throughput_counts_no_pipeline_fill(inflight: int, clustered: bool) -> None:
    """A stream whose link takes T = 0.2 s a frame, `inflight` frames at a time, after a fill of
    0.5 s: frames either finish one per T (staggered) or, sharing one shaped uplink in turn,
    `inflight` at once every `inflight` x T (clustered, within a few ms of each other). The
    true rate is 1/T either way; counting from the first completion would credit a whole
    cluster to no time (6 in flight, 12 frames: 1.83/T)."""
    from dapdee.bench.paperbench.stats import steady_throughput

    period, fill, n = 0.2, 0.5, 4 * inflight
    if clustered:
        ends = [fill + (i // inflight + 1) * inflight * period + 0.001 * (i % inflight) for i in range(n)]
    else:
        ends = [fill + (i + 1) * period for i in range(n)]
    starts = [0.0] * inflight + ends[: n - inflight]  # each frame starts when one leaves
    rate = steady_throughput(starts, ends, inflight)
    assert rate is not None and rate == pytest.approx(1 / period, rel=0.03)
    # fewer than two pipeline-fulls: all frames over the whole span, fill included
    short = steady_throughput(starts[:inflight], ends[:inflight], inflight)
    assert short == pytest.approx(inflight / ends[inflight - 1])


def test_adaptation_is_scored_against_the_optimum_at_the_same_frames_in_flight() -> None:
    """The required line divides the live stream's throughput by the optimum plan's at the live
    runtime's window; the optimum with its pipeline filled gives an informational line only."""
    phase = {
        "median_ms_second_half": 29.6,
        "throughput_fps_second_half": 264.2,
        "optimum_median_ms": 37.0,
        "optimum_throughput_fps": 257.5,
        "optimum_filled_throughput_fps": 388.2,
    }
    lines = adaptation_lines({"model": "alexnet", "mode": "throughput", "per_phase": {"4G": phase}}, 0.1, 0.1)
    (required,) = [t for t in lines if not t["info"]]
    (info,) = [t for t in lines if t["info"]]
    assert required["ratio"] == pytest.approx(264.2 / 257.5) and required["pass"]
    assert info["ratio"] == pytest.approx(264.2 / 388.2) and not info["pass"]
    slow = {**phase, "throughput_fps_second_half": 200.0}
    ad = {"model": "alexnet", "mode": "throughput", "per_phase": {"4G": slow}}
    (required,) = [t for t in adaptation_lines(ad, 0.1, 0.1) if not t["info"]]
    assert not required["pass"]  # 200 / 257.5 = 0.78 < 0.9


def test_a_cell_key_tells_profiling_repeats_and_probe_rounds_apart(tmp_path: Path) -> None:
    """The presets differ in how often they profile and probe: a cell measured with one must not
    be a cache hit for another (it was, but for adaptation's)."""
    from dataclasses import replace

    from dapdee.bench.paperbench.experiments import KEY_PARTS_AT, Bench
    from dapdee.bench.paperbench.options import smoke_options

    base = replace(smoke_options(), out=str(tmp_path))
    variants = [base, replace(base, profile_repeats=base.profile_repeats + 1), replace(base, probe_rounds=9)]
    keys = [Bench(o).key("light", "alexnet", "n2x1") for o in variants]
    assert len(set(keys)) == 3, keys
    assert all(k.split("|")[KEY_PARTS_AT] == "n2x1" for k in keys)
