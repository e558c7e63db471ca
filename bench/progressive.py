"""Static vs progressive (confidence-exit) planning, end to end through the real services.

    python bench/progressive.py [--frames N] [--networks CAT1,3G,4G] [--slowdown 10]
    dapdee bench progressive --frames 500

Starts the planner (uvicorn thread, in-process store) and one edge worker (its own process,
serving the ResNet-18 artifact, registering its graph and edge profile), then per network
(CAT1, 3G, 4G: the uplink shaped by `dapdee.netem.ShapedUplink`, `--rtt-ms` added per request)
runs the real device runtime (`dapdee.device.session.open_device`: device profile at K,
link probes, `POST /plan`, its device part with the split executor K x slower, the wire codec,
the shaped upload, the edge's v2 answer) twice on the same Fashion-MNIST test frames:

- static: plans without confidence exits; every frame leaves at the planned exit;
- progressive: plans asked with `confidence_exits: true`; the device checks the heads the plan
  puts on its side and the edge (asked with `confidence: true`) those on its side; a frame leaves
  at the first confident head.

Light load: one frame at a time; the runtime keeps its first plan (no re-planning, no idle
probes) so each cell measures one plan. Per cell: the planner's prediction (`latency_ms` of a
static plan, `expected_latency_ms` of a progressive one), frames/s (frames / wall time), mean and
p95 per-frame latency, the exits taken and on which side, and accuracy. Two accuracies are given:
`run` over the frames measured, and `split` over the whole Fashion-MNIST test split (10,000
images) computed offline by the same core function the runtime and the worker run
(`dapdee.progressive_run.run_sides` on the cell's plan; the whole-model exit for static plans),
which is exact for the rule: a frame's exit and answer do not depend on timing.

Targets, printed with PASS/FAIL and the ratio: at CAT1 progressive reaches >= 1.3x the static
frames/s or >= 25 % lower mean latency, at <= 1.2 points of accuracy below the final exit (split
accuracy); at 3G and 4G progressive is never worse than static beyond noise (mean latency within
2 standard errors of the difference). Writes OUT.json, OUT.md and OUT.png (accuracy vs frames/s,
static vs progressive, per network) under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "artifacts" / "fmnist-resnet18"
RESULTS = REPO / "bench" / "results"
DEFAULT_FRAMES = 2000  # per cell: 6 cells, set-up and the offline split take about 15 minutes on 2 cores
WARMUP_FRAMES = 8
FPS_TARGET = 1.3
LATENCY_CUT_TARGET = 0.25
ACCURACY_LOSS_LIMIT = 0.012
NOISE_SE = 2.0


@dataclass(frozen=True)
class Options:
    artifact: Path
    networks: tuple[str, ...]
    frames: int
    slowdown: float
    rtt_ms: float
    out: Path
    quiet: bool


def parse_options(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default=str(ARTIFACT), help="the artifact (default: the ResNet-18)")
    p.add_argument("--networks", default="CAT1,3G,4G", help="comma-separated networks (dapdee.netem names)")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"frames per cell (default {DEFAULT_FRAMES})")
    p.add_argument("--slowdown", type=float, default=10.0, help="K: the device is K x slower (default 10)")
    p.add_argument("--rtt-ms", type=float, default=10.0, help="round trip added per request (default 10)")
    p.add_argument("--out", default=str(RESULTS / "progressive"), help="output path stem")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.frames < 1:
        p.error("--frames: expected at least 1")
    if a.slowdown < 1:
        p.error("--slowdown: expected K >= 1")
    nets = tuple(n.strip() for n in a.networks.split(",") if n.strip())
    return Options(Path(a.artifact), nets, a.frames, a.slowdown, a.rtt_ms, Path(a.out), a.quiet)


def say(o: Options, *parts: Any) -> None:
    if not o.quiet:
        print(*parts, file=sys.stderr, flush=True)


# ---- the services -------------------------------------------------------------------------------


@contextlib.contextmanager
def services(o: Options, model: str) -> Iterator[tuple[str, str]]:
    """(planner URL, edge URL): the planner in a thread, the edge worker in its own process
    (as on its own machine: it does not share the device's interpreter), registered with an
    edge profile measured now (in a scratch cache)."""
    import tempfile

    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings
    from dapdee.testing import ServerThread, ServiceProcess, wait_registered

    scratch = tempfile.TemporaryDirectory(prefix="dapdee-bench-")
    planner = ServerThread(create_app(Settings(redis_url=None, worker_ttl_s=30.0)), name="planner").start()
    edge = ServiceProcess(
        "edge",
        ["--models", f"@{o.artifact}", "--planner", planner.url, "--profile-cache", scratch.name]
        + ["--workers", "1", "--threads", "1"],
        "/v2/health/live",
        {"DAPDEE_EDGE_HEARTBEAT_S": "1", "DAPDEE_EDGE_PROFILE_WARMUP": "2"},
    )
    edge.args += ["--public-url", edge.url]
    try:
        edge.start(600.0)
        wait_registered(planner.url, model, [edge.url], timeout_s=600.0)
        yield planner.url, edge.url
    finally:
        edge.stop()
        planner.stop()
        scratch.cleanup()


# ---- one cell ---------------------------------------------------------------------------------------


def device_settings(o: Options, planner_url: str, network: str, progressive: bool) -> Any:
    """A live device at K on `network`, fixed zero load, keeping its first plan."""
    from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig, default_tier
    from dapdee.device.session import DeviceSettings
    from dapdee.netem import parse_network

    rate = parse_network(network).rate_mbps
    forever = 1e9
    runtime = RuntimeConfig(
        Requirements(mode="latency", confidence_exits=progressive),
        replan_threshold=forever, plan_max_age_s=forever, probe_idle_s=forever, rtt_probe_every_s=forever,
        timeout_floor_ms=30_000.0,
    )  # fmt: skip
    return DeviceSettings(
        runtime=runtime, planner=PlannerConfig(planner_url, default_tier(o.slowdown), ready_timeout_s=600.0),
        weights=str(o.artifact), slowdown=o.slowdown, rate_mbps=rate, rtt_ms=o.rtt_ms, device_load=0.0,
        bandwidth_prior_mbps=rate,
    )  # fmt: skip


def plan_summary(plan: Any) -> dict[str, Any]:
    """What a cell's plan is: exit, cut, sent tensors, predicted latency and heads by side."""
    sides = plan.progressive
    heads = (
        {}
        if sides is None
        else {"device": [h.exit for h in sides.device.heads], "edge": [h.exit for h in sides.edge.heads]}
    )
    return {
        "plan_id": plan.plan_id,
        "exit": plan.exit,
        "device_nodes": len(plan.device_nodes),
        "edge_nodes": len(plan.edge_nodes),
        "transfer": [n for n, _ in plan.transfer],
        "predicted_ms": round(plan.predicted_ms, 3),
        "expected_ms": None if plan.expected_ms is None else round(plan.expected_ms, 3),
        "heads": heads,
    }


async def run_cell(o: Options, planner_url: str, loaded: Any, graph: Any, frames: list, net: str, prog: bool) -> dict:
    """Run `frames` through a live device on `net`; the cell's measurements and its plan."""
    from dapdee.device.session import open_device

    settings = device_settings(o, planner_url, net, prog)
    async with open_device(settings, loaded, graph) as rt:
        await rt.run(frames[:WARMUP_FRAMES])
        t0 = time.perf_counter()
        records = await rt.run(frames)
        wall = time.perf_counter() - t0
        plan, plans = rt.plan, len(rt.plans)
    lat = [r.measured_ms for r in records]
    labelled = [r for r in records if r.correct is not None]
    return {
        "network": net,
        "mode": "progressive" if prog else "static",
        "plan": plan_summary(plan),
        "plans_used": plans,
        "frames": len(records),
        "wall_s": round(wall, 3),
        "fps": len(records) / wall,
        "mean_ms": statistics.fmean(lat),
        "p95_ms": sorted(lat)[max(0, math.ceil(0.95 * len(lat)) - 1)],
        "se_ms": statistics.stdev(lat) / math.sqrt(len(lat)) if len(lat) > 1 else 0.0,
        "run_accuracy": sum(bool(r.correct) for r in labelled) / len(labelled) if labelled else None,
        "left": {
            f"{e}@{'edge' if w == 'edge' else 'device'}": c
            for (e, w), c in Counter((r.exit, r.where) for r in records).items()
        },
        "fallbacks": sum(r.where == "fallback" for r in records),
        "_plan": plan,
    }


# ---- accuracy over the whole test split --------------------------------------------------------------


def split_accuracy(loaded: Any, plan: Any, x: Any, y: Any, batch: int = 1000) -> tuple[float, dict[str, float]]:
    """Accuracy of `plan` on all of `x` (labels `y`) and the share of frames leaving at each
    exit@side: `run_sides` for a progressive plan, the planned exit's whole-model logits
    otherwise. O(N forward passes)."""
    import torch

    from dapdee.progressive_run import run_sides

    correct, left = 0, Counter()
    with torch.inference_mode():
        for lo in range(0, len(x), batch):
            xb, yb = x[lo : lo + batch], y[lo : lo + batch]
            if plan.progressive is not None:
                got = run_sides(loaded.executor, plan.progressive, loaded.input_name, xb)
                logits = got.logits
                left.update(f"{e}@{s}" for e, s in zip(got.exits, got.sides, strict=True))
            else:
                logits = loaded.run_exit(xb, plan.exit)
                left[f"{plan.exit}@{'edge' if plan.uses_edge else 'device'}"] += len(xb)
            correct += int((logits.argmax(1) == yb).sum())
    return correct / len(x), {k: v / len(x) for k, v in sorted(left.items())}


# ---- targets, report, plot ---------------------------------------------------------------------------


def targets(cells: list[dict[str, Any]], final_accuracy: float) -> list[dict[str, Any]]:
    """The target lines: CAT1 speed-up at bounded accuracy loss, 3G/4G never worse beyond noise."""
    by = {(c["network"], c["mode"]): c for c in cells}
    out = []
    for net in dict.fromkeys(c["network"] for c in cells):
        s, p = by.get((net, "static")), by.get((net, "progressive"))
        if s is None or p is None:
            continue
        fps_ratio, cut = p["fps"] / s["fps"], 1 - p["mean_ms"] / s["mean_ms"]
        loss = final_accuracy - p["split_accuracy"]
        if net == "CAT1":
            ok = (fps_ratio >= FPS_TARGET or cut >= LATENCY_CUT_TARGET) and loss <= ACCURACY_LOSS_LIMIT
            text = (
                f"{net}: progressive {fps_ratio:.2f}x frames/s (target >= {FPS_TARGET}x) or {cut:.1%} lower "
                f"mean latency (target >= {LATENCY_CUT_TARGET:.0%}), accuracy loss vs final {loss:.2%} "
                f"(<= {ACCURACY_LOSS_LIMIT:.1%})"
            )
        else:
            noise = NOISE_SE * math.hypot(s["se_ms"], p["se_ms"])
            ok = p["mean_ms"] <= s["mean_ms"] + noise
            text = (
                f"{net}: progressive mean {p['mean_ms']:.1f} ms vs static {s['mean_ms']:.1f} ms (never worse beyond "
                f"noise {noise:.2f} ms = {NOISE_SE:g} SE), {fps_ratio:.2f}x frames/s"
            )
        out.append(
            {
                "network": net,
                "pass": ok,
                "fps_ratio": fps_ratio,
                "latency_cut": cut,
                "accuracy_loss": loss,
                "text": text,
            }
        )
    return out


def table(cells: list[dict[str, Any]]) -> str:
    cols = ["network", "planning", "plan (exit, device/edge nodes, heads)", "frames", "frames/s", "pred ms", "mean ms"]
    cols += ["p95 ms", "run acc", "split acc", "left at (run)"]
    head = "| " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    for c in cells:
        pl = c["plan"]
        heads = ", ".join(f"{k}: {'+'.join(v)}" for k, v in pl["heads"].items() if v) or "-"
        left = ", ".join(f"{k} {v}" for k, v in sorted(c["left"].items()))
        pred = pl["expected_ms"] if pl["expected_ms"] is not None else pl["predicted_ms"]
        lines.append(
            f"| {c['network']} | {c['mode']} | {pl['exit']}, {pl['device_nodes']}/{pl['edge_nodes']}, {heads} | "
            f"{c['frames']} | {c['fps']:.2f} | {pred:.1f} | {c['mean_ms']:.1f} | {c['p95_ms']:.1f} | "
            f"{c['run_accuracy']:.4f} | {c['split_accuracy']:.4f} | {left} |"
        )
    return "\n".join(lines)


def plot(cells: list[dict[str, Any]], final_accuracy: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(
        zip(
            dict.fromkeys(c["network"] for c in cells), ("tab:red", "tab:orange", "tab:blue", "tab:green"), strict=False
        )
    )
    for net, color in colors.items():
        pts = {c["mode"]: c for c in cells if c["network"] == net}
        xs = [pts[m]["fps"] for m in ("static", "progressive") if m in pts]
        ys = [pts[m]["split_accuracy"] for m in ("static", "progressive") if m in pts]
        ax.plot(xs, ys, "-", color=color, alpha=0.5)
        for m, marker in (("static", "o"), ("progressive", "^")):
            if m in pts:
                ax.plot(pts[m]["fps"], pts[m]["split_accuracy"], marker, color=color, ms=9, label=f"{net} {m}")
    ax.axhline(final_accuracy - ACCURACY_LOSS_LIMIT, color="grey", ls=":", lw=1, label="final exit - 1.2 pts")
    ax.set_xlabel("frames/s (measured, one frame at a time)")
    ax.set_ylabel("accuracy (whole Fashion-MNIST test split)")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------


async def measure(o: Options, loaded: Any, graph: Any, planner_url: str) -> list[dict[str, Any]]:
    from dapdee.device.frames import DatasetSource, FrameFormat

    frames = list(DatasetSource("fashion-mnist", FrameFormat.of(loaded), o.frames + WARMUP_FRAMES))
    frames = frames[WARMUP_FRAMES:] + frames[:WARMUP_FRAMES]  # the warm-up frames are not measured
    cells = []
    for net in o.networks:
        for prog in (False, True):
            say(o, f"{net} {'progressive' if prog else 'static'}: {o.frames} frames ...")
            cell = await run_cell(o, planner_url, loaded, graph, frames[: o.frames], net, prog)
            say(o, f"  {cell['fps']:.2f} frames/s, mean {cell['mean_ms']:.1f} ms, plan {cell['plan']}")
            cells.append(cell)
    return cells


def main(argv: list[str] | None = None) -> int:
    import torch

    from dapdee import data as D
    from dapdee.device.profile import measure_device_profile
    from dapdee.models import load_model

    o = parse_options(argv)
    torch.set_num_threads(1)  # the device's compute thread; K x emulation on its CPU time
    loaded = load_model("", weights=o.artifact)
    if loaded.graph.progressive is None:
        print(f"artifact {o.artifact}: no calibrated confidence exits; run `dapdee calibrate` on it", file=sys.stderr)
        return 2
    say(o, f"measuring the device profile at K={o.slowdown:g} ...")
    graph = measure_device_profile(loaded, o.slowdown)
    t0 = time.monotonic()
    with services(o, loaded.name) as (planner_url, _edge_url):
        say(o, f"services up in {time.monotonic() - t0:.0f} s")
        cells = asyncio.run(measure(o, loaded, graph, planner_url))
    images, labels = D.load_raw("fashion-mnist", "test")
    x = D.capture_frames(images, loaded.input_shape, loaded.manifest["preprocess"])
    y = torch.as_tensor(labels)
    done: dict[str, tuple[float, dict[str, float]]] = {}  # plans that split the same way answer the same
    for c in cells:
        plan = c.pop("_plan")
        key = json.dumps([plan.exit, plan.uses_edge, None if plan.progressive is None else plan.progressive.as_dict()])
        if key not in done:
            say(o, f"split accuracy of {c['network']} {c['mode']} on {len(x)} images ...")
            done[key] = split_accuracy(loaded, plan, x, y)
        c["split_accuracy"], c["split_left"] = done[key]
    final_accuracy = loaded.graph.exit("final").accuracy or 0.0
    lines = targets(cells, final_accuracy)
    head = (
        f"ResNet-18 (Fashion-MNIST), device K={o.slowdown:g}, rtt +{o.rtt_ms:g} ms, {o.frames} frames per cell "
        f"(one at a time) through planner + edge worker + device runtime; split accuracy over all {len(x)} test images"
    )
    md = "\n".join(
        [f"# Static vs progressive planning\n\n{head}\n", table(cells), "", "## Targets", ""]
        + [f"- {'PASS' if t['pass'] else 'FAIL'} {t['text']}" for t in lines]
    )
    print(md)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{o.out}.md").write_text(md + "\n")
    Path(f"{o.out}.json").write_text(
        json.dumps({"setup": head, "final_accuracy": final_accuracy, "cells": cells, "targets": lines}, indent=1) + "\n"
    )
    plot(cells, final_accuracy, Path(f"{o.out}.png"), head)
    say(o, f"wrote {o.out}.md, .json, .png")
    return 0 if all(t["pass"] for t in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
