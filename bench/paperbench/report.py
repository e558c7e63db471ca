"""The paper bench's report: `paper.md` (setup, one table per experiment, the targets) and
`paper.json` (everything, machine-readable)."""

from __future__ import annotations

from typing import Any

from dapdee.bench.paperbench.options import MAX_INFLIGHT, Options
from dapdee.bench.paperbench.plans import LABEL, PLANNERS
from dapdee.bench.paperbench.scoring import THROUGHPUT_RATIO, format_target

Md = list[str]
WORST = 8  # rows of the largest latency errors shown term by term


def _f(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _fig7_k(o: Options) -> str:
    own = ", ".join(f"{m} at **K = {k:g}**" for m, k in o.fig7_k.items() if m in o.models)
    return own or f"every model at K = {o.slowdown:g}"


def _cpus(o: Options) -> str:
    if o.cpu_split is None:
        return "The edge worker, the device and the planner share every CPU of the host (`--no-pin`)."
    edge, rest = (", ".join(map(str, c)) for c in o.cpu_split)
    return (f"The edge worker runs on CPU {edge}, the device (its compute, uplink shaping and HTTP) on CPU "
            f"{rest}, as on machines of their own; the planner, idle while a plan is measured, on any.")  # fmt: skip


def _setup(o: Options, info: dict[str, Any], cmd: str) -> Md:
    return [
        "# DAPDEE paper evaluation (measured)",
        "",
        f"Command: `{cmd}` (variant: {o.variant}). Device slowdown **K = {o.slowdown:g}** (the device is K x "
        "slower than this machine, 1 torch thread); Figure 7: " + _fig7_k(o) + "; "
        f"added RTT {o.rtt_ms:g} ms; uplinks shaped by token bucket on 127.0.0.1 (CAT1 0.13, 3G 1.1, 4G 5.85, "
        "WiFi 18.88 Mbit/s). Planner and edge worker as `dapdee serve` processes over HTTP (the worker calibrates "
        f"its profile to whole frames and measures its per-request cost at start-up, each the median of "
        f"{o.profile_passes} bursts); the device runtime "
        "(`dapdee.device`) with the shaped uplink, its own published profile (the median of "
        f"{o.profile_passes} whole profiles 1 s apart, {o.profile_repeats} runs per node; with its per-request "
        "cost) and the "
        'round trip it senses in every plan request; baselines from `POST /plan {"baseline": NAME}` over the '
        "same merged profiles; real Fashion-MNIST test images; shipped artifacts. "
        f"Light load: {o.light_frames} frames per plan in {o.rounds} interleaved rounds; heavy load: "
        f"{o.heavy_frames} frames per plan (each round streams for at least {o.heavy_min_s:g} s) offered at "
        f"{o.heavy_factor:g} x Device-Only's predicted rate, at least {o.max_inflight} in flight (more when the "
        "plan's predicted latency / bottleneck needs more to fill the pipeline, at most 32); every plan's "
        f"measurement capped at {o.plan_cap_s:g} s per round (capped cells say so; a plan predicted slower than "
        "the cap per frame is not run). Planners with identical plans share one measurement. A plan whose "
        f"rounds disagree by more than {o.tiebreak_ratio:g}x (heavy: throughput; light: median latency) gets "
        "one tie-break round, and its throughput is the median round's. " + _cpus(o),
        "",
        "Noise band (90th percentile of the relative spread between the two rounds of the same plan): "
        f"latency ±{info['latency_band'] * 100:.1f} % ({info['latency_samples']} plans), throughput "
        f"±{info['throughput_band'] * 100:.1f} % ({info['throughput_samples']} plans).",
        "",
    ]


def _devices(res: dict[str, Any]) -> Md:
    seen: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
    for c in res["light"] + res["heavy"]:
        seen.setdefault((c["model"], c["request"]["device_tier"]), (c["request"]["rtt_ms"], c["overheads"]))
    for c in res["fig7"]:
        seen.setdefault((c["model"], c["tier"]), (c["rtt_ms"], c["overheads"]))
    if not seen:
        return []
    each = [f"{m} ({tier}): round trip {rtt:.1f} ms, device {_f(ov['device_request_ms'], '.2f')} ms, "
            f"edge {_f(ov['edge_request_ms'], '.2f')} ms{_edge_calibration(ov)}"
            for (m, tier), (rtt, ov) in seen.items()]  # fmt: skip
    return ["What each device stated and the planner priced (cost model v2): the round trip in every plan request "
            "(the device runtime's RTT estimate + the fixed per-request cost its probe pairs measure) and the "
            "per-request costs, the device's (measured by the runtime at start-up) and the edge's (measured by the "
            "worker): " + "; ".join(each) + ".", ""]  # fmt: skip


def _edge_calibration(overheads: dict[str, Any]) -> str:
    """The edge's calibration to whole frames as the report prints it after its request cost
    (its ratio, and the whole-frame bursts when there were several); "" for a cell written
    before the bench recorded it."""
    cal = overheads.get("edge_calibration") or {}
    if cal.get("calibration") is None:
        return ""
    bursts = cal.get("frame_ms_passes")
    return f" (edge calibration x{cal['calibration']:.3f}" + (f"; whole-frame bursts {bursts} ms)" if bursts else ")")


def _light(res: dict[str, Any]) -> Md:
    md = [
        "## 1. Light load: measured latency, median / p90 ms (exit, device nodes / exit nodes)",
        "",
        "| model | net | " + " | ".join(LABEL[p] for p in PLANNERS) + " |",
        "|---|---|" + "---|" * len(PLANNERS),
    ]
    for c in res["light"]:
        cells = []
        for p in PLANNERS:
            v, pl = c["planners"][p], c["planners"][p]["plan"]
            if v["median_ms"] is None:
                s = f"capped (pred {pl['predicted']['latency_ms']:.0f})"
            else:
                s = f"{v['median_ms']:.1f} / {v['p90_ms']:.1f}" + (" (capped)" if v["capped"] else "")
            cells.append(s + f" ({pl['exit']}, {pl['device_nodes']}/{pl['exit_nodes']})")
        md.append(f"| {c['model']} | {c['network']} | " + " | ".join(cells) + " |")
    accs = [f"{c['model']} {c['network']} {c['planners']['dapdee']['plan']['exit']} "
            f"{_f(c['planners']['dapdee']['plan']['exit_accuracy'], '.4f')} "
            f"(frames {_f(c['planners']['dapdee']['frame_accuracy'], '.2f')})" for c in res["light"]]  # fmt: skip
    return md + ["", "Exit accuracy (held-out test split) of DAPDEE's plans: " + ", ".join(accs), ""]


def _heavy(res: dict[str, Any]) -> Md:
    md = ["## 2. Heavy load: measured throughput, frames/s (median latency ms; exit)", "",
          "| model | net | offered fps | " + " | ".join(LABEL[p] for p in PLANNERS) + " |",
          "|---|---|---|" + "---|" * len(PLANNERS)]  # fmt: skip
    for c in res["heavy"]:
        cells = []
        for p in PLANNERS:
            v = c["planners"][p]
            s = "capped" if not v["throughput_fps"] else f"{v['throughput_fps']:.2f} ({_f(v['median_ms'])}; "
            s += "" if not v["throughput_fps"] else f"{v['plan']['exit']})" + (" (capped)" if v["capped"] else "")
            cells.append(s)
        md.append(f"| {c['model']} | {c['network']} | {c['offered_fps']:.1f} | " + " | ".join(cells) + " |")
    return md + [""]


def _fig6(res: dict[str, Any], o: Options) -> Md:
    md = [f"## 3. Figure 6 analogue: latency budget at {o.fig6_network}", "",
          "| model | budget ms | exit | exit acc | device/exit nodes | bytes | pred ms | meas ms |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in res["fig6"]:
        for p in c["points"]:
            pl = p["plan"]
            md.append(f"| {c['model']} | {p['budget_ms']:.1f} | {pl['exit']} | {_f(pl['exit_accuracy'], '.4f')} | "
                      f"{pl['device_nodes']}/{pl['exit_nodes']} | {pl['bytes']} | "
                      f"{pl['predicted']['latency_ms']:.1f} | {_f(p['median_ms'])} |")  # fmt: skip
    return md + [""]


def _fig7(res: dict[str, Any], o: Options) -> Md:
    md = ["## 4. Figure 7 analogue: bandwidth sweep at a fixed budget", "",
          f"Budget = {o.fig7_budget_frac:g} x the Device-Only latency of the final exit (predicted); DAPDEE's plan "
          "per bandwidth (latency mode), measured. K is the device factor of the sweep (" + _fig7_k(o) + "). "
          "Predicted stages of the chosen cut: device (its nodes + the device's per-request cost) / transfer "
          "(uplink + round trip) / edge (its nodes + the edge's per-request cost), "
          "beside the Device-Only and Edge-Only predictions: the cost model's reason for the cut.", "",
          "| model | K | Mbit/s | exit | cut | device/exit nodes | sent after | bytes sent | device FLOPs share "
          "| pred device / transfer / edge ms | pred ms | Device-Only ms | Edge-Only ms | meas ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in res["fig7"]:
        for p in c["points"]:
            pl, pr = p["plan"], p["plan"]["predicted"]
            md.append(
                f"| {c['model']} | {c['slowdown']:g} | {p['bandwidth_mbps']:g} | {pl['exit']} | {pl['kind']} | "
                f"{pl['device_nodes']}/{pl['exit_nodes']} | {', '.join(pl['sent_after']) or '-'} | {pl['bytes']:,} | "
                f"{pl['device_flops_frac']:.2f} | {pr['device_ms']:.1f} / {pr['transfer_ms']:.1f} / "
                f"{pr['edge_ms']:.1f} | {pr['latency_ms']:.1f} | {p['device_only']['latency_ms']:.1f} | "
                f"{p['edge_only']['latency_ms']:.1f} | {_f(p['median_ms'])} |"
            )
    return md + [""]


def _terms(t: dict[str, Any]) -> str:
    return " / ".join(_f(t.get(k)) for k in ("device_ms", "transfer_ms", "edge_ms"))


def _worst(r: dict[str, Any]) -> str:
    m = r["measured_terms"]
    parts = [m.get(k) or 0.0 for k in ("device_ms", "edge_compute_ms", "edge_queue_ms")]
    meas = " / ".join(_f(v) for v in [*parts, r["measured_ms"] - sum(parts)])
    return (f"| {r['where']} | {r['predicted_ms']:.1f} | {r['measured_ms']:.1f} | {r['rel_error']:.3f} | "
            f"{_terms(r['predicted_terms'])} | {meas} |")  # fmt: skip


def _fidelity(info: dict[str, Any]) -> Md:
    fid, tf = info["fidelity"], info["throughput_fidelity"]
    lo, hi = THROUGHPUT_RATIO
    md = ["## 5. Prediction fidelity", "",
          f"Latency: {fid['plans']} measured sequential plans (light load + both sweeps): median relative error "
          f"{_f(fid['median'], '.3f')}, p90 {_f(fid['p90'], '.3f')}. The largest errors, term by term (measured: "
          "the device's compute incl. the emulation, the edge's reported compute and queue, and the rest: the "
          "device's request CPU, the wire, the round trip and the edge's HTTP work):", "",
          "| plan | pred ms | meas ms | error | pred device / transfer / edge ms "
          "| meas device / edge compute / edge queue / rest ms |", "|---|---|---|---|---|---|",
          *[_worst(r) for r in sorted(fid["rows"], key=lambda r: -r["rel_error"])[:WORST]], "",
          f"Throughput (heavy load): {tf['inside']} of {tf['plans']} distinct plans measure within "
          f"[{lo}, {hi}] x their predicted rate (median ratio {_f(tf['median_ratio'], '.3f')}); by the stage "
          "that bounds the predicted rate: " + _by_bottleneck(tf.get("by_bottleneck", {})) + ". Per plan, the "
          "predicted stages (device / transfer / edge ms), the measured per-frame terms (device compute incl. "
          "the emulation, the edge's reported compute and queue ms), and the CPU ms a frame took of the device's "
          "process (its compute without the emulation's sleep, the requests, the bench's bookkeeping) and of the "
          "edge worker's (priced as its edge stage):", "",
          "| plan | kind | bound by | pred fps | meas fps | meas / pred | pred device / transfer / edge ms "
          "| meas device / edge compute / edge queue ms | CPU ms per frame: device / edge |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in tf["rows"]:
        m = r["measured_terms"]
        meas = " / ".join(_f(m.get(k)) for k in ("device_ms", "edge_compute_ms", "edge_queue_ms"))
        cpu = " / ".join(_f(m.get(k)) for k in ("device_cpu_ms", "edge_cpu_ms"))
        rates = f"{r['predicted_fps']:.1f} | {r['measured_fps']:.1f} | {r['ratio']:.3f}"
        md.append(f"| {r['where']} | {r['plan_kind']} | {r.get('bottleneck', '-')} | {rates} | "
                  f"{_terms(r['predicted_terms'])} | {meas} | {cpu} |")  # fmt: skip
    return md + [""]


def _by_bottleneck(stages: dict[str, dict[str, Any]]) -> str:
    """'device 31 plans, 31 inside, median 1.023; ...' (a link-bound plan pays the unpriced OIP
    header); '-' for results written before the breakdown."""
    parts = [
        f"{stage} {s['plans']} plans, {s['inside']} inside, median {_f(s['median_ratio'], '.3f')}"
        + (" (the OIP v2 header each request sends is not priced)" if stage == "link" else "")
        for stage, s in stages.items()
    ]
    return "; ".join(parts) or "-"


def _adaptation(ad: dict[str, Any] | None) -> Md:
    if not ad:
        return []
    md = ["## 6. Adaptation (the device runtime's own loop, bandwidth changes during the stream)", "",
          f"Model {ad['model']}, {ad['mode']} mode (chosen as the model whose optimal plans differ most across the "
          f"phases: {ad['distinct_optimal_plans']} distinct); the runtime sensed the link itself and put "
          f"{ad['plans']} plans in use; phases " + ", ".join(f"{p['network']} {p['seconds']:g} s" for p in ad["phases"])
          + ".", "",
          "| phase | frames | DAPDEE plans used (2nd half: exit, device nodes) | measured median ms | frames/s "
          "| optimum plan | its measured median ms | its frames/s | pipeline filled: median ms | frames/s "
          "| its predicted ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, v in ad["per_phase"].items():
        md.append(f"| {n} | {v['frames']} | {', '.join(v['plans_used'])} | {_f(v['median_ms_second_half'])} | "
                  f"{_f(v['throughput_fps_second_half'])} | {v['optimum_plan']} | {_f(v['optimum_median_ms'])} | "
                  f"{_f(v['optimum_throughput_fps'])} | {_f(v.get('optimum_filled_median_ms'))} | "
                  f"{_f(v.get('optimum_filled_throughput_fps'))} | {_f(v['optimum_predicted_ms'])} |")  # fmt: skip
    note = (
        "The optimum plan runs as a fixed plan with the live runtime's frames in flight (the target's "
        f"comparison), and again with its pipeline filled (up to {MAX_INFLIGHT} in flight; informational)."
    )
    return md + ["", note, ""]


def _informational(lines: list[dict[str, Any]]) -> str:
    """The tally's note on the informational lines that fail: the speedup lines short of 9.9x
    (or unmeasured) apart from the others (e.g. adaptation against a filled pipeline)."""
    failing = [t for t in lines if t.get("info") and not t["pass"]]
    speedup = [t for t in failing if t["group"] == "speedup"]
    unmeasured = sum(t["ratio"] is None for t in speedup)
    other = len(failing) - len(speedup)
    parts = [f"{len(speedup)} informational speedup line(s) short of 9.9x"
             + (f" ({unmeasured} of them not measured)" if unmeasured else "")]  # fmt: skip
    if other:
        parts.append(f"{other} other informational line(s) failing")
    return ", ".join(parts) + ", see their notes"


def _targets(lines: list[dict[str, Any]]) -> Md:
    """The targets section: every line, then the tally of the required ones, the failing
    informational ones by kind, and the baseline comparisons that hold without the noise band."""
    strict = [t for t in lines if t["group"] in ("light", "heavy") and t["ratio"] is not None]
    strict_ok = [t for t in strict if (t["ratio"] <= 1.0 if t["group"] == "light" else t["ratio"] >= 1.0)]
    required = [t for t in lines if not t.get("info")]
    tally = (f"{sum(t['pass'] for t in required)} PASS, {sum(not t['pass'] for t in required)} FAIL of the required "
             f"target lines ({_informational(lines)}). Without the noise band "
             f"(ratio <= 1 for latency, >= 1 for throughput): {len(strict_ok)} of {len(strict)} baseline comparisons "
             "hold (identical plans count as 1.000).")  # fmt: skip
    return ["## Targets", "", "```", *[format_target(t) for t in lines], "```", "", tally, ""]


def markdown(res: dict[str, Any], lines: list[dict[str, Any]], info: dict[str, Any], o: Options,
             skipped: dict[str, str], plots: list[str], cmd: str) -> str:  # fmt: skip
    """The Markdown report: setup, one table per experiment, fidelity, targets."""
    md = _setup(o, info, cmd) + _devices(res)
    if skipped:
        md += [f"Skipped: {', '.join(f'{k} ({v})' for k, v in skipped.items())}.", ""]
    md += _light(res) + _heavy(res) + _fig6(res, o) + _fig7(res, o) + _fidelity(info)
    md += _adaptation(res.get("adaptation")) + _targets(lines)
    if plots:
        md += ["Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
    return "\n".join(md)
