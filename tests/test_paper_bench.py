"""bench/paper.py end to end at its smallest size (`--smoke`: AlexNet, 4G, 2 frames per plan,
all six planners, tiny sweeps and adaptation) through the real planner, edge worker and device
client; then a rerun that must take every cell from the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "artifacts" / "fmnist-alexnet"
PLANNERS = ("device-only", "edge-only", "neurosurgeon", "dads", "edgent", "dapdee")


def _run(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "paper.py"), "--smoke", "--quiet", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


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
        "paper_adaptation.png",
    ):
        assert (tmp_path / name).is_file(), name
    doc = json.loads((tmp_path / "paper.json").read_text())
    res = doc["results"]
    assert doc["setup"]["slowdown"] == 10.0
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
    # DAPDEE's plan is never predicted worse than a baseline's (exact under the cost model)
    light = res["light"][0]["planners"]
    for name in PLANNERS:
        assert light["dapdee"]["plan"]["predicted"]["latency_ms"] <= (
            light[name]["plan"]["predicted"]["latency_ms"] * (1 + 1e-9)
        )
    # every planner prices plans with the round trip the device client sensed (the shaped 20 ms
    # plus the fixed per-request cost its probe pairs measure), not the nominal RTT alone
    # (a lower bound only: the shaper adds 20 ms; how much the host adds depends on its load)
    rtt = res["light"][0]["request"]["rtt_ms"]
    assert rtt > 20.0 and res["heavy"][0]["request"]["rtt_ms"] == rtt
    # the graph takes raw uint8 frames: an Edge-Only plan ships 1 byte per input pixel
    assert light["edge-only"]["plan"]["bytes"] == 32 * 32
    assert res["fig6"] and res["fig7"] and res["adaptation"]["frames"]
    md = (tmp_path / "paper.md").read_text()
    assert "K = 10" in md
    # every target has its line, PASS or FAIL as the JSON says, and the tally counts them
    lines = md.splitlines()
    assert doc["targets"] and all(t["what"] for t in doc["targets"])
    for t in doc["targets"]:
        want = f"{'PASS' if t['pass'] else 'FAIL'}  {t['what']}:"
        assert any(line.startswith(want) for line in lines), want
    required = [t for t in doc["targets"] if not t.get("info")]
    n_pass = sum(bool(t["pass"]) for t in required)
    assert f"{n_pass} PASS, {len(required) - n_pass} FAIL of the required" in md
    cells = json.loads((tmp_path / "paper_cells.json").read_text())["cells"]
    assert len(cells) == doc["cells_measured"] >= 5

    # resumable: everything cached (no cell measured, so no servers started), same numbers
    p2 = _run(tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    doc2 = json.loads((tmp_path / "paper.json").read_text())
    assert doc2["cells_measured"] == 0 and doc2["cells_cached"] == len(cells)
    assert doc2["results"]["light"] == res["light"]
