"""Where does the planner cut a camera-size model as the uplink sweeps? (Fig. 7 in the cost model)

Profiles the model on this machine twice, the device tier K x slower (`--slowdown`, default 30,
about a Raspberry Pi's gap to an edge server) and the edge tier at K = 1, merges the two, and
asks the planner for the latency-optimal plan of the final exit at `--points` log-spaced uplinks
from `--min-mbps` to `--max-mbps` plus the named networks (CAT1, 3G, 4G, WiFi), at `--rtt-ms`
and zero load. Prints bandwidth -> cut (device nodes, bytes sent, predicted latency) and the
number of distinct mid-network cuts (device part neither empty nor the whole exit); writes
OUT.md, OUT.json (rows + summary), OUT.profile.json (the merged profile) and OUT.png.
`--min-mid-cuts N` makes it exit 1 when fewer than N distinct mid cuts turn up.

    python bench/cut_sweep.py --artifact artifacts/fmnist-resnet18-224
    python bench/cut_sweep.py --model 'zoo:resnet18?width=0.25&stem=patch8' --input-size 224

An untrained `--model` gets the artifacts' graph input all the same: a `frame` node (the
dataset's preprocessing recipe) in front, so the graph takes the raw uint8 frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dapdee.costgraph import CostGraph
from dapdee.data import FrameNormalize, default_preprocess
from dapdee.models import LoadedModel, build_module, check_model_name, load_model, parse_spec, trace
from dapdee.netem import NETWORKS
from dapdee.planning import PlanMap, PlanRequest, baseline_plan
from dapdee.profiler import merge_profiles, profile_model
from dapdee.training.train import input_shape_for

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cut_sweep"


def load_candidate(spec: str, input_size: int, dataset: str, name: str | None) -> LoadedModel:
    """An untrained model traced as an artifact would be: uint8 frame in, `frame` node first. O(one forward)."""
    shape = input_shape_for(spec, input_size)
    ms = parse_spec(spec)
    module = build_module(ms)
    frame = FrameNormalize.from_recipe(default_preprocess(dataset, shape), shape[1])
    gm, graph, ex = trace(module, shape, check_model_name(name or ms.default_name), frame)
    graph = CostGraph(graph.model, graph.input, graph.nodes, graph.exits, meta={"spec": spec})
    return LoadedModel(graph.model, spec, module, gm, graph, ex, shape)


def merged_profile(loaded: LoadedModel, slowdown: float, repeats: int) -> CostGraph:
    """Device timings at K = `slowdown`, edge timings at K = 1, both on 1 thread. O(2 (repeats + 3) forwards)."""
    device = profile_model(loaded, "device", slowdown=slowdown, threads=1, repeats=repeats)
    edge = profile_model(loaded, "edge", slowdown=1.0, threads=1, repeats=repeats)
    return merge_profiles(device, edge)


def sweep(graph: CostGraph, bandwidths: list[tuple[str, float]], rtt_ms: float) -> list[dict[str, Any]]:
    """The latency-mode plan of the final exit at each (label, Mbit/s), zero load, with the
    Device-Only and Edge-Only latencies beside it. O(front + V) per point."""
    pm = PlanMap.build(graph)
    n_exit = len(graph.ancestors(graph.exits[-1].node))
    rows = []
    for label, bw in bandwidths:
        req = PlanRequest(bandwidth_mbps=bw, rtt_ms=rtt_ms, mode="latency")
        plan = pm.plan(req)
        ref = {b: baseline_plan(graph, req, b)["predicted"]["latency_ms"] for b in ("device-only", "edge-only")}
        dev = plan["device_nodes"]
        kind = "edge-only" if not dev else "device-only" if not plan["edge_nodes"] else "mid"
        rows.append(
            {
                "network": label,
                "bandwidth_mbps": bw,
                "kind": kind,
                "device_nodes": len(dev),
                "exit_nodes": n_exit,
                "sent_bytes": sum(t["bytes"] for t in plan["transfer"]),
                "cut_after": [t["node"] for t in plan["transfer"]],
                "latency_ms": plan["predicted"]["latency_ms"],
                "device_only_ms": ref["device-only"],
                "edge_only_ms": ref["edge-only"],
                "device_set": dev,
            }
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Distinct mid cuts (by device set, in sweep order) and the cut kind at each named network."""
    mids = list(dict.fromkeys(tuple(r["device_set"]) for r in rows if r["kind"] == "mid"))
    named = {r["network"]: r["kind"] for r in rows if r["network"] in NETWORKS}
    return {
        "distinct_mid_cuts": len(mids),
        "mid_cuts": [{"device_nodes": len(m), "last": m[-1]} for m in mids],
        "named_networks": named,
        "named_mid": sum(k == "mid" for k in named.values()),
    }


def markdown(rows: list[dict[str, Any]], summ: dict[str, Any], head: str) -> str:
    lines = [head, "", "| uplink Mbit/s | network | cut | device nodes | bytes sent | sent after | latency ms "
             "| Device-Only ms | Edge-Only ms |", "|---:|---|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['bandwidth_mbps']:.3g} | {r['network'] if r['network'] in NETWORKS else ''} | {r['kind']} "
            f"| {r['device_nodes']}/{r['exit_nodes']} | {r['sent_bytes']:,} | {', '.join(r['cut_after'])} "
            f"| {r['latency_ms']:.1f} | {r['device_only_ms']:.1f} | {r['edge_only_ms']:.1f} |"
        )
    named = ", ".join(f"{k} {v}" for k, v in summ["named_networks"].items())
    lines += ["", f"**distinct mid-network cuts: {summ['distinct_mid_cuts']}**; named networks: {named}"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Top: share of the exit's nodes on the device, each mid cut labelled by the node(s) it
    ships; bottom: predicted latency of the plan vs Device-Only and Edge-Only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = [r["bandwidth_mbps"] for r in rows]
    fig, (top, bot) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
    top.step(bw, [r["device_nodes"] / r["exit_nodes"] for r in rows], where="mid", color="0.6", zorder=2)
    for kind, c in {"edge-only": "C0", "mid": "C2", "device-only": "C3"}.items():
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        top.scatter([r["bandwidth_mbps"] for r in sel], [r["device_nodes"] / r["exit_nodes"] for r in sel],
                    color=c, label=kind, zorder=3)  # fmt: skip
    seen: set[tuple[str, ...]] = set()
    for r in rows:
        if r["kind"] == "mid" and tuple(r["cut_after"]) not in seen:
            seen.add(tuple(r["cut_after"]))
            label = f"{', '.join(r['cut_after'])}: {r['sent_bytes']:,} B"
            top.annotate(label, (r["bandwidth_mbps"], r["device_nodes"] / r["exit_nodes"]), fontsize=7,
                         xytext=(0, 6), textcoords="offset points", ha="center")  # fmt: skip
    top.set_ylabel("device share of the exit's nodes")
    top.set_ylim(-0.05, 1.15)
    top.legend(fontsize=8, loc="center left")
    bot.plot(bw, [r["latency_ms"] for r in rows], color="C2", marker=".", label="DAPDEE plan")
    bot.plot(bw, [r["device_only_ms"] for r in rows], color="C3", ls="--", label="Device-Only")
    bot.plot(bw, [r["edge_only_ms"] for r in rows], color="C0", ls="--", label="Edge-Only")
    bot.set_yscale("log")
    bot.set_ylabel("predicted latency (ms)")
    bot.set_xscale("log")
    bot.set_xlabel("uplink (Mbit/s)")
    bot.legend(fontsize=8)
    for ax in (top, bot):
        for name, rate in NETWORKS.items():
            ax.axvline(rate, color="0.8", lw=0.8, zorder=1)
            if ax is top:
                ax.text(rate, 1.01, name, fontsize=7, ha="center", transform=ax.get_xaxis_transform())
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="trained artifact directory")
    src.add_argument("--model", help="model spec of an untrained candidate (zoo:NAME?opts or pkg.mod:factory)")
    p.add_argument("--input-size", type=int, default=224, help="square input side of --model (default 224)")
    p.add_argument("--dataset", default="fashion-mnist", help="preprocessing recipe of --model's frame node")
    p.add_argument("--name", default=None, help="graph name of --model (default: the zoo name)")
    p.add_argument("--slowdown", "-K", type=float, default=30.0, help="device factor K (default 30)")
    p.add_argument("--rtt-ms", type=float, default=25.0)
    p.add_argument("--min-mbps", type=float, default=0.05)
    p.add_argument("--max-mbps", type=float, default=50.0)
    p.add_argument("--points", type=int, default=40)
    p.add_argument("--repeats", type=int, default=30, help="timed runs per node and tier (median)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output prefix (default bench/results/cut_sweep)")
    p.add_argument("--min-mid-cuts", type=int, default=0, help="exit 1 when fewer distinct mid cuts are found")
    a = p.parse_args(argv)
    if a.artifact:
        loaded = load_model("", weights=a.artifact)
    else:
        loaded = load_candidate(a.model, a.input_size, a.dataset, a.name)
    graph = merged_profile(loaded, a.slowdown, a.repeats)
    grid = [(f"{b:.3g}", float(b)) for b in np.geomspace(a.min_mbps, a.max_mbps, a.points)]
    bandwidths = sorted(grid + list(NETWORKS.items()), key=lambda t: t[1])
    rows = sweep(graph, bandwidths, a.rtt_ms)
    summ = summary(rows)
    head = (
        f"Cut sweep: {loaded.spec} ({a.artifact or 'untrained'}), input {list(loaded.input_shape)} "
        f"{graph.input.dtype} = {graph.input.bytes:,} B; device K = {a.slowdown:g}, edge K = 1 (1 thread each, "
        f"median of {a.repeats}); rtt {a.rtt_ms:g} ms, zero load, latency mode, final exit"
    )
    text = markdown(rows, summ, head)
    print(text, end="")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    report = {"head": head, "summary": summ, "rows": rows, "slowdown": a.slowdown, "rtt_ms": a.rtt_ms}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    graph.save(str(out.with_suffix(".profile.json")))
    plot(rows, out.with_suffix(".png"), f"{loaded.name}: latency-optimal cut vs uplink (K = {a.slowdown:g})")
    print(f"wrote {out}.md, .json, .profile.json, .png", file=sys.stderr)
    if summ["distinct_mid_cuts"] < a.min_mid_cuts:
        print(f"FAIL: {summ['distinct_mid_cuts']} distinct mid cuts, wanted >= {a.min_mid_cuts}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
