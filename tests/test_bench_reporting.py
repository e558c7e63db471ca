"""The benchmarks' reporting on hand-written inputs: a phase, a cell or a run without a measured
value still gets its target line, failing and saying why, and the tallies count what they name.
No benchmark, service or model runs here."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dapdee.bench.fleet_bench import report as fleet_report
from dapdee.bench.paperbench.adaptation import adaptation
from dapdee.bench.paperbench.experiments import Bench
from dapdee.bench.paperbench.options import Options, build_options, cpu_split
from dapdee.bench.paperbench.report import _targets
from dapdee.bench.paperbench.scoring import (
    _fidelity_lines,
    _speedups,
    adaptation_lines,
    format_target,
    throughput_fidelity,
)
from dapdee.bench.paperbench.systems import Services

PHASE = {
    "median_ms_second_half": 29.6,
    "throughput_fps_second_half": 264.2,
    "optimum_median_ms": 37.0,
    "optimum_throughput_fps": 257.5,
    "optimum_filled_throughput_fps": 388.2,
}


def _adapt(mode: str, **phases: dict[str, Any]) -> dict[str, Any]:
    """An adaptation cell of AlexNet in `mode` with the given phases (name -> figures)."""
    return {"model": "alexnet", "mode": mode, "per_phase": phases}


def _required(lines: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """The required (non-informational) lines of one phase."""
    return [t for t in lines if not t["info"] and f") {phase}: " in t["what"]]


def test_a_stalled_throughput_phase_fails_with_ratio_zero() -> None:
    """Throughput mode: a phase in which no frame completed in the second half (0 frames/s)
    gets its required line, FAIL with ratio 0, so the tally cannot read all PASS."""
    stalled = {**PHASE, "throughput_fps_second_half": 0.0}
    lines = adaptation_lines(_adapt("throughput", **{"4G": PHASE, "CAT1": stalled}), 0.1, 0.1)
    (cat1,) = _required(lines, "CAT1")
    assert cat1["pass"] is False and cat1["ratio"] == 0.0
    assert "no frame completed" in cat1["note"]
    assert [t["pass"] for t in _required(lines, "4G")] == [True]


def test_a_latency_phase_is_judged_on_latency_even_when_its_median_is_missing() -> None:
    """Latency mode: no frame started in the phase's second half (median None) gives a FAIL
    latency line with no ratio, never a throughput line, however many frames finished there."""
    stalled = {**PHASE, "median_ms_second_half": None, "throughput_fps_second_half": 2.0,
               "optimum_throughput_fps": 2.1}  # fmt: skip
    lines = adaptation_lines(_adapt("latency", **{"4G": PHASE, "CAT1": stalled}), 0.1, 0.1)
    assert len(lines) == 2
    (cat1,) = _required(lines, "CAT1")
    assert cat1["what"].endswith("/ optimum plan latency") and cat1["ratio"] is None and cat1["pass"] is False
    assert "no frame started" in format_target(cat1)


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_a_phase_whose_optimum_was_not_measured_is_a_counted_fail(mode: str) -> None:
    """An optimum plan that was not measured (capped: median and rate None) leaves the phase's
    required line in place, FAIL with no ratio."""
    capped = {**PHASE, "optimum_median_ms": None, "optimum_throughput_fps": None}
    (line,) = _required(adaptation_lines(_adapt(mode, **{"3G": capped}), 0.1, 0.1), "3G")
    assert line["pass"] is False and line["ratio"] is None and "not measured" in line["note"]


def _planner(tput: float | None, pred: float) -> dict[str, Any]:
    """A heavy-load planner entry: measured and predicted throughput."""
    return {"throughput_fps": tput, "plan": {"predicted": {"throughput_fps": pred}}}


def _heavy(network: str, dapdee: float | None, device_only: float | None) -> dict[str, Any]:
    """A heavy-load ResNet-18 cell with DAPDEE's and Device-Only's measured throughputs."""
    return {"model": "resnet18", "network": network,
            "planners": {"dapdee": _planner(dapdee, 120.0), "device-only": _planner(device_only, 8.0)}}  # fmt: skip


@pytest.mark.parametrize(("dapdee", "device_only", "named"), [(None, 8.0, "DAPDEE"), (50.0, None, "Device-Only")])
def test_the_4g_speedup_line_stays_when_a_throughput_is_missing(
    dapdee: float | None, device_only: float | None, named: str
) -> None:
    """A 4G heavy cell whose DAPDEE or Device-Only throughput was not measured still has its
    speedup line, FAIL, naming which was not measured; cells at other networks have none."""
    res = {"heavy": [_heavy("4G", dapdee, device_only), _heavy("3G", 50.0, 8.0)]}
    (line,) = _speedups(res, build_options([]))
    assert line["pass"] is False and line["ratio"] is None and line["info"] is False
    assert f"not measured: {named} heavy throughput" in line["note"]


def test_the_tally_counts_only_speedup_lines_as_short_of_9_9x() -> None:
    """A failing informational adaptation line (the optimum with its pipeline filled) is not
    reported as a speedup line short of 9.9x; it is counted on its own."""
    lines = adaptation_lines(_adapt("throughput", **{"4G": PHASE}), 0.1, 0.1)  # the filled line fails: 0.68
    tally = _targets(lines)[-2]
    assert "0 informational speedup line(s) short of 9.9x" in tally
    assert "1 other informational line(s) failing" in tally
    chain = {**_heavy("4G", 50.0, 8.0), "model": "alexnet"}  # a chain model: informational, 6.25x
    tally = _targets(lines + _speedups({"heavy": [chain]}, build_options([])))[-2]
    assert "1 informational speedup line(s) short of 9.9x, 1 other informational line(s) failing" in tally


class _KeyOnly(Bench):
    """A bench that records the cache key each cell asks for and measures nothing."""

    def __init__(self, o: Options) -> None:
        super().__init__(o)
        self.keys: list[str] = []

    async def cell(self, key: str, fn: Callable[[Any], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        self.keys.append(key)
        return {}


def _adapt_key(out: Path, *argv: str, **fields: Any) -> str:
    """The adaptation cell's cache key under the command line `argv`, with `fields` of the
    options set to other values."""
    b = _KeyOnly(replace(build_options(["--out", str(out), *argv]), **fields))
    asyncio.run(adaptation(b, ["alexnet"]))
    (key,) = b.keys
    return key


def test_the_adaptation_cell_key_holds_the_optimum_frames_and_probe_rounds(tmp_path: Path) -> None:
    """Each phase's optimum plan is measured with `fig_frames` frames and the live device probes
    its link `probe_rounds` times: another value of either is another cell."""
    base = _adapt_key(tmp_path)
    assert _adapt_key(tmp_path, "--fig-frames", "20") != base
    assert _adapt_key(tmp_path, "--smoke") != _adapt_key(tmp_path, "--smoke", "--fig-frames", "2")  # smoke: 1
    assert _adapt_key(tmp_path, probe_rounds=3) != base
    # a cell measured with the edge worker on a CPU of its own is not one measured sharing them
    assert _adapt_key(tmp_path, cpu_split=((1,), (0,))) != _adapt_key(tmp_path, cpu_split=None)


def test_the_edge_worker_gets_a_cpu_of_its_own_unless_told_otherwise(tmp_path: Path) -> None:
    """The split covers this process's CPUs, one for the worker and the rest for the others,
    disjoint; `--no-pin` (or a single CPU) shares them."""
    cpus = os.sched_getaffinity(0)
    split = cpu_split()
    if len(cpus) < 2:
        assert split is None
    else:
        assert split is not None
        edge, rest = map(set, split)
        assert len(edge) == 1 and edge | rest == cpus and not edge & rest
    assert build_options(["--out", str(tmp_path)]).cpu_split == split
    assert build_options(["--out", str(tmp_path), "--no-pin"]).cpu_split is None


def test_the_worker_gets_its_cpu_and_the_planner_every_cpu_not_the_devices(tmp_path: Path) -> None:
    """With the CPUs split, the worker's command keeps it on its CPU and the planner's gives it
    every CPU back (started from the bench's process, it would inherit the device's); shared,
    neither is pinned. Nothing is started."""
    split = replace(build_options(["--out", str(tmp_path)]), cpu_split=((2,), (0, 1)))
    svc = Services(split, ["alexnet"])
    assert svc.edge_proc.command()[:3] == ["taskset", "-c", "2"]
    assert svc.planner_proc.command()[:3] == ["taskset", "-c", "0,1,2"]
    shared = Services(replace(split, cpu_split=None), ["alexnet"])
    assert "taskset" not in shared.edge_proc.command() + shared.planner_proc.command()


def test_keep_to_moves_every_thread_already_running_and_those_started_later() -> None:
    """In a process of its own (it changes the whole process): a thread started before the call
    and one started after both end up on the one CPU given."""
    cpu = min(os.sched_getaffinity(0))
    code = f"""
import os, threading
from dapdee.bench.paperbench.cli import keep_to
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
keep_to(({cpu},))
threading.Thread(target=stop.wait, daemon=True).start()
masks = [os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")]
print(len(masks), sorted({{c for m in masks for c in m}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    threads, seen = out.stdout.split(" ", 1)
    assert int(threads) >= 3 and seen.strip() == f"[{cpu}]", out.stdout


def _fleet_run(n: int, **kw: Any) -> dict[str, Any]:
    """A DAPDEE-fleet run's summary at resnet18 K=30 with every figure within its target."""
    base = {"system": "DAPDEE-fleet", "n": n, "k": 30.0, "model": "resnet18", "booked_max": 0.5,
            "booking_series": [[20.0, 0.5, 1000.0]], "planner_run_counts": {}, "utilisation": 0.5,
            "worker_cpu": 0.6, "edge_rejected": {}, "answered_fps": 160.0, "pred_err_latency": 0.05,
            "pred_err_throughput": 0.04, "pred_err_throughput_devices": 3,
            "plan_changes_per_device_min": 0.0}  # fmt: skip
    return {**base, **kw}


def test_a_fleet_run_with_no_answered_frames_fails_the_every_n_targets_by_name() -> None:
    """A run in which no frame was answered has no prediction errors: the latency and
    throughput prediction targets FAIL and name it, though the other run is within them."""
    silent = _fleet_run(64, answered_fps=0.0, pred_err_latency=None, pred_err_throughput=None,
                        pred_err_throughput_devices=0)  # fmt: skip
    got = {t.name: t for t in fleet_report._every_fleet_run([_fleet_run(16), silent], 0.9)}
    for what in ("latency", "throughput"):
        t = got[f"median {what} prediction error <= 10% (DAPDEE-fleet, every N)"]
        assert t.ok is False and "no answered frames at resnet18 K=30 N=64" in t.detail, t.line()
    # a run whose devices all ran at the camera's rate has no throughput error to score: not a failure
    camera = _fleet_run(32, pred_err_throughput=None, pred_err_throughput_devices=0)
    t = fleet_report._every_fleet_run([_fleet_run(16), camera], 0.9)[3]
    assert t.ok is True and "N=32" not in t.detail


def test_a_capacity_drop_over_the_leases_fails_the_booking_target_without_a_poll() -> None:
    """No booking poll succeeded (no series, no peak), and the planner registered a capacity
    drop over the leases: the target FAILs, and the detail names the run unpolled; without the
    drop it FAILs too (a run the target cannot vouch for)."""
    run = _fleet_run(16, booked_max=None, booking_series=[], planner_run_counts={"drops_forced": 2.0})
    t = fleet_report._every_fleet_run([run], 0.9)[0]
    assert t.ok is False and t.line().startswith("FAIL  leases never book")
    assert "no booking poll succeeded at resnet18 K=30 N=16" in t.detail
    unpolled = {**run, "planner_run_counts": {}}
    assert fleet_report._every_fleet_run([unpolled], 0.9)[0].ok is False


def test_a_fleet_run_no_booking_poll_of_which_succeeded_fails_the_booking_target() -> None:
    """One fleet run was polled (within rho_max), the other never: the target cannot vouch for
    the second, so it FAILs and names it (before, the polled run alone passed it)."""
    unpolled = _fleet_run(32, booked_max=None, booking_series=[])
    t = fleet_report._every_fleet_run([_fleet_run(16), unpolled], 0.9)[0]
    assert t.ok is False and "no booking poll succeeded at resnet18 K=30 N=32" in t.detail, t.line()
    assert fleet_report._every_fleet_run([_fleet_run(16), _fleet_run(32)], 0.9)[0].ok is True


def test_fleet_runs_whose_plans_all_meet_the_frame_rate_say_so_in_the_throughput_target() -> None:
    """Every fleet run recorded which devices a plan bounds, and none is: the throughput target
    has nothing to score (n/a) and says 0 such devices, not that no run recorded them."""
    camera = [_fleet_run(n, pred_err_throughput=None, pred_err_throughput_devices=0) for n in (16, 32)]
    t = fleet_report._every_fleet_run(camera, 0.9)[3]
    assert t.ok is None and "0 device(s) whose plan predicts less than the frame rate" in t.detail, t.line()
    older = [{k: v for k, v in r.items() if k != "pred_err_throughput_devices"} for r in camera]
    assert "no run recorded which devices a plan bounds" in fleet_report._every_fleet_run(older, 0.9)[3].detail


def _heavy_stream(fps: float, frames: int, fell_back: int) -> dict[str, Any]:
    """One planner's heavy-load result as the bench writes it: an Edge-Only plan predicted at
    0.1 frames/s, measured at `fps`, `fell_back` of its `frames` answered by the device."""
    stages = {"device_ms": 3.5, "transfer_ms": 9285.0, "edge_ms": 7.4, "throughput_fps": 0.1}
    return {"plan": {"predicted": stages, "kind": "edge-only"}, "throughput_fps": fps, "frames": frames,
            "where": {"edge": frames - fell_back, "local": 0, "fallback": fell_back}, "same_plan_as": []}  # fmt: skip


def test_a_heavy_stream_that_only_fell_back_says_it_measured_the_fallback() -> None:
    """Every frame of the 224-px Edge-Only stream at CAT1 fell back to the device (the worker's
    body timeout): its fidelity line still fails, and says the plan itself never ran."""
    res = {"heavy": [{"model": "m", "network": "CAT1", "planners": {
        "edge-only": _heavy_stream(0.6, 14, 14), "neurosurgeon": _heavy_stream(0.11, 10, 2)}}]}  # fmt: skip
    lines = {t["what"]: t for t in _fidelity_lines({"plans": 0}, throughput_fidelity(res))}
    all_back = lines["heavy m CAT1 edge-only: measured / predicted throughput"]
    assert not all_back["pass"] and "all 14 frames fell back to the device" in all_back["note"]
    some_back = lines["heavy m CAT1 neurosurgeon: measured / predicted throughput"]
    assert some_back["pass"] and some_back["note"].endswith("; 2 of 10 frames fell back to the device")


def _bound_stream(stages: dict[str, float], measured_fps: float) -> dict[str, Any]:
    """A heavy-load result with the predicted stages `stages` measured at `measured_fps`."""
    return {"plan": {"predicted": stages, "kind": "mid"}, "throughput_fps": measured_fps, "frames": 60,
            "where": {"edge": 60, "local": 0, "fallback": 0}, "same_plan_as": []}  # fmt: skip


def test_heavy_plans_are_grouped_by_the_stage_that_bounds_their_predicted_rate() -> None:
    """Each heavy plan is filed under the stage whose predicted time is its predicted frame
    period: device, edge, or else the link (whose time the terms do not show alone: transfer
    adds the round trip); each group counts its plans inside the band and its median ratio."""
    stages = {
        "device-bound": {"device_ms": 40.0, "transfer_ms": 30.0, "edge_ms": 3.0, "throughput_fps": 25.0},
        "edge-bound": {"device_ms": 1.5, "transfer_ms": 25.0, "edge_ms": 4.0, "throughput_fps": 250.0},
        "link-bound": {"device_ms": 1.5, "transfer_ms": 31.4, "edge_ms": 3.0, "throughput_fps": 134.3},
    }
    res = {"heavy": [{"model": "m", "network": "4G", "planners": {
        "device-bound": _bound_stream(stages["device-bound"], 26.0),
        "edge-bound": _bound_stream(stages["edge-bound"], 190.0),
        "link-bound": _bound_stream(stages["link-bound"], 115.2)}}]}  # fmt: skip
    tf = throughput_fidelity(res)
    assert {r["where"].split()[-1]: r["bottleneck"] for r in tf["rows"]} == {
        "device-bound": "device", "edge-bound": "edge", "link-bound": "link"}  # fmt: skip
    assert tf["by_bottleneck"]["edge"] == {"plans": 1, "inside": 0, "median_ratio": 0.76}
    assert tf["by_bottleneck"]["device"]["inside"] == 1 and tf["by_bottleneck"]["link"]["inside"] == 1
    assert abs(tf["by_bottleneck"]["link"]["median_ratio"] - 115.2 / 134.3) < 1e-9


def test_the_adaptation_key_changes_with_each_candidate_models_artifact(tmp_path: Path) -> None:
    """The adaptation cell chooses among several models: each one's artifact id is in its key,
    so a re-trained candidate is measured again (the key held '' for several models)."""
    b = _KeyOnly(build_options(["--out", str(tmp_path)]))
    b.ids = {"alexnet": "aaaa", "resnet18-224": "bbbb"}
    asyncio.run(adaptation(b, ["alexnet", "resnet18-224"]))
    b.ids["resnet18-224"] = "retrained"
    asyncio.run(adaptation(b, ["alexnet", "resnet18-224"]))
    first, second = b.keys
    assert "aaaa,bbbb" in first and first != second


def test_profiles_are_cached_per_profiling_preset(tmp_path: Path) -> None:
    """A cell keyed by its preset's repeats and passes is measured on profiles of that preset:
    the profile cache (checked only for model, K and threads) is a folder per preset."""
    from dapdee.bench.paperbench.systems import profile_dir

    base = build_options(["--out", str(tmp_path)])
    assert profile_dir(base) != profile_dir(replace(base, profile_repeats=base.profile_repeats + 1))
    assert profile_dir(base) != profile_dir(replace(base, profile_passes=base.profile_passes + 1))
    assert profile_dir(base).parent == tmp_path / "profiles"


def _light(median_ms: float | None, frames: int = 10, fell_back: int = 0, same: list[str] | None = None) -> Any:
    return {"plan": {"predicted": {"latency_ms": 50.0, "device_ms": 50.0, "transfer_ms": 0.0, "edge_ms": 0.0,
                                   "throughput_fps": 2.0}, "kind": "mid"},
            "median_ms": median_ms, "throughput_fps": 20.0 if median_ms else None, "frames": frames,
            "where": {"edge": frames - fell_back, "local": 0, "fallback": fell_back},
            "same_plan_as": same or []}  # fmt: skip


def test_a_comparison_names_fallback_and_fails_when_dapdees_frames_all_fell_back() -> None:
    """DAPDEE against a baseline: a baseline whose frames fell back to the device is compared
    with that note; a DAPDEE plan whose frames all fell back was not measured (FAIL)."""
    from dapdee.bench.paperbench.scoring import BASELINES, _versus

    others = {b: _light(60.0) for b in BASELINES}
    cell = {"model": "m", "network": "CAT1", "cap_ms": 1e5,
            "planners": {"dapdee": _light(40.0), **others, "edge-only": _light(900.0, 14, 14)}}  # fmt: skip
    lines = {t["what"].split("/")[1]: t for t in _versus(cell, "light", 0.1)}
    edge = lines["Edge-Only latency"]
    assert edge["pass"] and "Edge-Only: 14 of 14 frames fell back to the device" in edge["note"]
    assert "fell back" not in lines["DADS latency"]["note"]
    cell["planners"]["dapdee"] = _light(40.0, 10, 10)
    assert not any(t["pass"] for t in _versus(cell, "light", 0.1))


def test_a_heavy_baseline_not_run_is_compared_with_its_predicted_throughput() -> None:
    """A baseline predicted too slow to run (capped) used to pass against any DAPDEE throughput
    above zero; DAPDEE must reach the baseline's predicted throughput within the band."""
    from dapdee.bench.paperbench.scoring import BASELINES, _versus

    def heavy(fps: float | None, predicted: float) -> dict[str, Any]:
        return {**_light(10.0), "throughput_fps": fps, "plan": {"predicted": {"throughput_fps": predicted}}}

    planners = {"dapdee": heavy(0.01, 30.0), **{b: heavy(20.0, 20.0) for b in BASELINES}}
    planners["neurosurgeon"] = heavy(None, 0.5)
    cell = {"model": "m", "network": "4G", "cap_ms": 1e5, "planners": planners}
    (line,) = [t for t in _versus(cell, "heavy", 0.1) if "Neurosurgeon" in t["what"]]
    assert not line["pass"] and "predicted 0.5 fps" in line["note"]
    planners["dapdee"] = heavy(0.46, 30.0)  # within 10 % of the 0.5 predicted
    (line,) = [t for t in _versus(cell, "heavy", 0.1) if "Neurosurgeon" in t["what"]]
    assert line["pass"]


def test_fidelity_leaves_out_plans_that_only_fell_back_and_fails_their_throughput_rows() -> None:
    """A light plan whose frames all fell back measured the fallback, not its prediction: left
    out of the latency median (and counted); a heavy row whose frames all fell back fails even
    when its ratio lands in the band."""
    from dapdee.bench.paperbench.scoring import fidelity

    res = {"light": [{"model": "m", "network": "4G", "planners": {
        "dapdee": _light(50.0), "edge-only": _light(5.0, 10, 10)}}], "fig6": [], "fig7": []}  # fmt: skip
    fid = fidelity(res)
    assert fid["plans"] == 1 and fid["median"] == 0.0 and fid["fell_back"] == 1
    inside = {"heavy": [{"model": "m", "network": "CAT1", "planners": {"edge-only": _heavy_stream(0.1, 14, 14)}}]}
    (row,) = _fidelity_lines({"plans": 0}, throughput_fidelity(inside))
    assert row["ratio"] == 1.0 and not row["pass"]
