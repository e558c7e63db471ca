"""Targets: every target line of the paper evaluation, with its ratio and PASS/FAIL, and the numbers they
rest on (the noise band from repeated rounds, prediction fidelity).

- light / heavy: DAPDEE against each baseline, latency (<= 1 + band) and throughput (>= 1 − band);
- speedup: DAPDEE / Device-Only throughput at 4G, >= 9.9 (informational for chains and
  camera-size inputs, see `options.CAMERA_SIZE`);
- accuracy: the worst accuracy loss vs the final exit wherever the final exit's class is allowed;
- adaptation: the live loop per phase against that phase's optimum plan;
- fidelity: median |predicted − measured| / measured over the sequential plans (<= 0.10), and for
  heavy load each distinct plan's measured / predicted throughput within [0.8, 1.25];
- cuts: the camera-size Fig. 7 moves through at least three distinct mid-network cuts.
"""

from __future__ import annotations

import statistics
from typing import Any

from dapdee.bench.paperbench.options import ACC_CLASS, CAMERA_SIZE, DAG_MODELS, MAX_INFLIGHT, Options
from dapdee.bench.paperbench.plans import BASELINES, LABEL, PLANNERS
from dapdee.bench.paperbench.stats import med, pct

FIDELITY_MEDIAN = 0.10
THROUGHPUT_RATIO = (0.8, 1.25)
MIN_MID_CUTS = 3

Lines = list[dict[str, Any]]


def line(group: str, what: str, ratio: float | None, ok: bool, note: str = "", info: bool = False) -> dict[str, Any]:
    """One target line; `info`: reported for completeness, required by no target."""
    return {"group": group, "what": what, "ratio": ratio, "pass": ok, "note": note, "info": info}


def first_of_plan(name: str, v: dict[str, Any]) -> bool:
    """True for the first planner (in PLANNERS order) of those sharing this plan's measurement."""
    return all(PLANNERS.index(b) > PLANNERS.index(name) for b in v.get("same_plan_as", []))


def _spreads(cells: list[dict[str, Any]], field: str) -> list[float]:
    out = []
    for cell in cells:
        for k, v in cell["planners"].items():
            r = [x for x in v.get(field, []) if x]
            if first_of_plan(k, v) and not v.get("capped") and len(r) >= 2:
                out.append(abs(r[0] - r[1]) / statistics.fmean(r[:2]))
    return out


def noise_bands(res: dict[str, Any]) -> dict[str, Any]:
    """Relative spread |a − b| / mean between two rounds of the same plan, over every measured
    plan; the band is its 90th percentile (latency from light load, throughput from heavy)."""
    lat, thr = _spreads(res["light"], "round_median_ms"), _spreads(res["heavy"], "round_throughput_fps")
    return {"latency_band": pct(lat, 0.9) if lat else 0.1, "throughput_band": pct(thr, 0.9) if thr else 0.1,
            "latency_samples": len(lat), "throughput_samples": len(thr),
            "latency_spreads": lat, "throughput_spreads": thr}  # fmt: skip


def fell_back(v: dict[str, Any]) -> tuple[int, int]:
    """(frames that fell back to the device, frames) of a measured plan (0, 0 when not recorded)."""
    return (v.get("where") or {}).get("fallback", 0), v.get("frames", 0)


def all_fell_back(v: dict[str, Any]) -> bool:
    """Whether every frame of a measured plan fell back to the device: it measured the
    fallback, not the plan."""
    n, frames = fell_back(v)
    return frames > 0 and n == frames


def _fallback_note(v: dict[str, Any], who: str) -> str:
    n, frames = fell_back(v)
    return f"; {who}: {n} of {frames} frames fell back to the device" if n else ""


def _versus(cell: dict[str, Any], kind: str, band: float) -> Lines:
    """DAPDEE against each baseline in one light (latency) or heavy (throughput) cell. A
    baseline not run (capped: predicted past the cap) is beaten by any DAPDEE latency within the
    cap, or by a DAPDEE throughput within the band of the baseline's predicted one; a DAPDEE
    plan whose every frame fell back to the device was not measured (FAIL); fallback frames
    on either side are named in the note."""
    metric, sign = ("median_ms", "latency") if kind == "light" else ("throughput_fps", "throughput")
    d, out = cell["planners"]["dapdee"], []
    for b in BASELINES:
        v = cell["planners"][b]
        what = f"{kind} {cell['model']} {cell['network']}: DAPDEE/{LABEL[b]} {sign}"
        if b in d["same_plan_as"]:
            out.append(line(kind, what, 1.0, True, "same plan"))
        elif not d[metric]:
            out.append(line(kind, what, None, False, "DAPDEE capped"))
        elif all_fell_back(d):
            out.append(line(kind, what, None, False, "DAPDEE's frames all fell back to the device: not measured"))
        elif not v[metric]:
            out.append(_versus_capped(kind, what, d[metric], v, cell["cap_ms"], band))
        else:
            r = d[metric] / v[metric]
            light = kind == "light"
            ok, bound = (r <= 1 + band, f"<= {1 + band:.3f}") if light else (r >= 1 - band, f">= {1 - band:.3f}")
            out.append(line(kind, what, r, ok, bound + _fallback_note(d, "DAPDEE") + _fallback_note(v, LABEL[b])))
    return out


def _versus_capped(kind: str, what: str, mine: float, v: dict[str, Any], cap_ms: float, band: float) -> dict[str, Any]:
    """The line against a baseline predicted past the cap and not run: light, DAPDEE's latency
    within the cap; heavy, DAPDEE's throughput within the band of the baseline's predicted one."""
    name = what.split("/")[-1].rsplit(" ", 1)[0]
    if kind == "light":
        return line(kind, what, None, mine <= cap_ms, f"{name} capped (predicted past {cap_ms:g} ms)")
    predicted = v["plan"]["predicted"].get("throughput_fps") or 0.0
    return line(kind, what, None, mine >= (1 - band) * predicted, f"{name} capped (predicted {predicted:.3g} fps)")


def _speedup_line(cell: dict[str, Any], o: Options) -> dict[str, Any]:
    """The 4G speedup line of one heavy cell: DAPDEE / Device-Only measured throughput, >= 9.9
    (informational for chain and camera-size models); a FAIL with no ratio when either of the two
    throughputs was not measured (capped), naming which."""
    d, dev = cell["planners"]["dapdee"], cell["planners"]["device-only"]
    m = cell["model"]
    scope = (" (chain model: informational)" if m not in DAG_MODELS
             else " (camera-size input: informational)" if m in CAMERA_SIZE else "")  # fmt: skip
    what = f"heavy {m} 4G: DAPDEE/Device-Only throughput (K={o.slowdown:g})"
    missing = [name for name, v in (("DAPDEE", d), ("Device-Only", dev)) if not v["throughput_fps"]]
    if missing:
        note = f">= 9.9{scope}; not measured: {' and '.join(missing)} heavy throughput (capped or not run)"
        return line("speedup", what, None, False, note, info=bool(scope))
    r = d["throughput_fps"] / dev["throughput_fps"]
    pd, pdev = d["plan"]["predicted"].get("throughput_fps"), dev["plan"]["predicted"].get("throughput_fps")
    own = f"{pd / pdev:.2f}" if pd and pdev else "-"
    note = f">= 9.9{scope}; the cost model's own ratio for these plans: {own}"
    return line("speedup", what, r, r >= 9.9, note, info=bool(scope))


def _speedups(res: dict[str, Any], o: Options) -> Lines:
    """One speedup line per heavy cell at 4G (`_speedup_line`), measured or not."""
    return [_speedup_line(cell, o) for cell in res["heavy"] if cell["network"] == "4G"]


def _accuracy(res: dict[str, Any]) -> Lines:
    """The worst accuracy loss vs the final exit wherever the budget (or frame rate) allows
    the final exit's accuracy class."""
    checks = []
    for cell in res["fig6"]:
        fa = cell["final_accuracy"]
        for p in cell["points"]:
            if p["class_allowed"] and fa is not None and p["plan"]["exit_accuracy"] is not None:
                checks.append((f"fig6 {cell['model']} budget {p['budget_ms']:.0f} ms", fa - p["plan"]["exit_accuracy"]))
    for kind in ("heavy", "light"):
        for cell in res[kind]:
            final = cell["planners"]["device-only"]["plan"]["exit_accuracy"]  # the final exit's
            fa = cell["planners"]["dapdee"]["plan"]["exit_accuracy"]
            if final is not None and fa is not None:
                checks.append((f"{kind} {cell['model']} {cell['network']}", final - fa))
    if not checks:
        return []
    worst = max(checks, key=lambda x: x[1])
    what = f"accuracy loss vs final exit, worst of {len(checks)} plans in the class ({worst[0]})"
    return [line("accuracy", what, worst[1], worst[1] <= ACC_CLASS + 1e-9, f"<= {ACC_CLASS}")]


def _adapt_latency(what: str, v: dict[str, Any], lb: float) -> dict[str, Any]:
    """A latency-mode phase's line: the live stream's second-half median / the optimum plan's
    median, <= 1 + lb; a FAIL with no ratio when either median is missing (no frame started in
    the second half, or the optimum plan not measured)."""
    live, opt, what = v["median_ms_second_half"], v["optimum_median_ms"], f"{what} / optimum plan latency"
    need = f"<= {1 + lb:.3f}"
    if live is None:
        return line("adaptation", what, None, False, f"{need}; no frame started in the phase's second half")
    if not opt:
        return line("adaptation", what, None, False, f"{need}; the optimum plan was not measured (capped or not run)")
    r = live / opt
    return line("adaptation", what, r, r <= 1 + lb, need)


def _adapt_rate(what: str, live: float | None, opt: float | None, tb: float, note: str, info: bool) -> dict[str, Any]:
    """One throughput-mode adaptation line: the live stream's second-half frames/s / the optimum
    plan's, >= 1 − tb. A live rate of 0 (a stalled phase) gives ratio 0; a missing live rate (a
    phase of no length) or a missing optimum gives a FAIL with no ratio."""
    if live is None:
        return line("adaptation", what, None, False, f"{note}; no second half measured", info=info)
    if not opt:
        return line("adaptation", what, None, False, f"{note}; the optimum plan was not measured", info=info)
    stalled = "" if live else "; no frame completed in the phase's second half"
    return line("adaptation", what, live / opt, live / opt >= 1 - tb, note + stalled, info=info)


def _adapt_throughput(what: str, v: dict[str, Any], tb: float) -> Lines:
    """A throughput-mode phase's lines: against the optimum plan at the live runtime's frames in
    flight (required) and with its pipeline filled (informational; absent from results written
    before it was measured)."""
    live, need = v["throughput_fps_second_half"], f">= {1 - tb:.3f}"
    out = [_adapt_rate(f"{what} / optimum plan throughput (same frames in flight)", live,
                       v["optimum_throughput_fps"], tb, need, False)]  # fmt: skip
    if "optimum_filled_throughput_fps" in v:
        filled_what = f"the optimum with its pipeline filled, up to {MAX_INFLIGHT} in flight"
        out.append(_adapt_rate(f"{what} / optimum plan throughput, pipeline filled", live,
                               v["optimum_filled_throughput_fps"], tb, f"{need} (informational: {filled_what})",
                               True))  # fmt: skip
    return out


def adaptation_lines(ad: dict[str, Any] | None, lb: float, tb: float) -> Lines:
    """The adaptation target lines: per phase, chosen by the cell's mode alone, the live stream
    against the optimum plan (latency; or throughput at the same frames in flight, required, and
    with its pipeline filled, informational). A phase whose live or optimum value is missing or
    zero still gets its lines, failing, so a stalled phase is never left out of the tally."""
    if not ad:
        return []
    out: Lines = []
    for n, v in ad.get("per_phase", {}).items():
        what = f"adaptation {ad['model']} ({ad['mode']}) {n}: DAPDEE"
        out += [_adapt_latency(what, v, lb)] if ad["mode"] == "latency" else _adapt_throughput(what, v, tb)
    return out


def _fidelity_lines(fid: dict[str, Any], tfid: dict[str, Any]) -> Lines:
    out = []
    if fid["plans"]:
        left_out = f"; {fid['fell_back']} whose frames all fell back left out" if fid.get("fell_back") else ""
        what = (f"median |pred - meas| / meas over {fid['plans']} sequential plans, light load + sweeps "
                f"(p90 {fid['p90']:.3f}{left_out})")  # fmt: skip
        out.append(line("fidelity", what, fid["median"], fid["median"] <= FIDELITY_MEDIAN, f"<= {FIDELITY_MEDIAN}"))
    lo, hi = THROUGHPUT_RATIO
    for row in tfid["rows"]:
        what = f"heavy {row['where']}: measured / predicted throughput"
        out.append(line("fidelity", what, row["ratio"], row["inside"], f"in [{lo}, {hi}]" + _fell_back(row)))
    return out


def _fell_back(row: dict[str, Any]) -> str:
    """A fidelity row's note on frames that fell back to the device: a stream whose every frame
    did measured the fallback, not the plan (rows written before it was recorded: none). O(1)."""
    n, frames = row.get("fell_back", 0), row.get("frames", 0)
    if not n:
        return ""
    if n == frames:
        return f"; all {n} frames fell back to the device, so this measures the fallback, not the plan"
    return f"; {n} of {frames} frames fell back to the device"


def _cuts(res: dict[str, Any]) -> Lines:
    """Camera-size Fig. 7 sweeps: the distinct mid-network cuts DAPDEE's measured plans took."""
    out = []
    for cell in res["fig7"]:
        if cell["model"] not in CAMERA_SIZE:
            continue
        mids = distinct_mid_cuts(cell)
        what = f"fig7 {cell['model']} (K={cell['slowdown']:g}): distinct mid-network cuts over the sweep"
        cuts = ", ".join(f"{c['device_nodes']}/{c['exit_nodes']} nodes, {c['bytes']:,} B" for c in mids)
        out.append(line("cuts", what, float(len(mids)), len(mids) >= MIN_MID_CUTS, f">= {MIN_MID_CUTS} ({cuts})"))
    return out


def distinct_mid_cuts(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct mid-network cuts (device part neither empty nor the whole exit) of a Fig. 7
    cell's measured points, in sweep order."""
    seen: dict[tuple[str, int, int], dict[str, Any]] = {}
    for p in cell["points"]:
        pl = p["plan"]
        if pl["kind"] == "mid" and p["median_ms"] is not None:
            seen.setdefault((pl["exit"], pl["device_nodes"], pl["bytes"]), pl)
    return list(seen.values())


def targets(res: dict[str, Any], o: Options) -> tuple[Lines, dict[str, Any]]:
    """Every target line, and the numbers behind them (noise bands, both fidelities)."""
    bands = noise_bands(res)
    lb, tb = bands["latency_band"], bands["throughput_band"]
    lines: Lines = []
    for cell in res["light"]:
        lines += _versus({**cell, "cap_ms": o.plan_cap_s * 1000}, "light", lb)
    for cell in res["heavy"]:
        lines += _versus({**cell, "cap_ms": o.plan_cap_s * 1000}, "heavy", tb)
    lines += _speedups(res, o) + _accuracy(res) + adaptation_lines(res.get("adaptation"), lb, tb)
    fid, tfid = fidelity(res), throughput_fidelity(res)
    lines += _fidelity_lines(fid, tfid) + _cuts(res)
    return lines, {**bands, "fidelity": fid, "throughput_fidelity": tfid}


def _row(where: str, v: dict[str, Any], pred: dict[str, Any]) -> dict[str, Any]:
    p = pred["latency_ms"]
    return {"where": where, "predicted_ms": p, "measured_ms": v["median_ms"],
            "rel_error": abs(p - v["median_ms"]) / v["median_ms"],
            "predicted_terms": {k: pred[k] for k in ("device_ms", "transfer_ms", "edge_ms")},
            "measured_terms": v.get("terms_ms", {})}  # fmt: skip


def fidelity(res: dict[str, Any]) -> dict[str, Any]:
    """Relative error of the predicted latency per measured sequential plan (light load and
    both sweeps): |pred − median measured| / median measured, with each plan's terms; a plan
    whose frames all fell back to the device measured the fallback, not its prediction: left
    out, and counted (`fell_back`)."""
    rows, fallback = [], 0
    for cell in res["light"]:
        for k, v in cell["planners"].items():
            if first_of_plan(k, v) and v["median_ms"]:
                if all_fell_back(v):  # it measured the fallback, not the plan predicted
                    fallback += 1
                    continue
                rows.append(_row(f"light {cell['model']} {cell['network']} {k}", v, v["plan"]["predicted"]))
    for kind, label in (("fig6", "budget_ms"), ("fig7", "bandwidth_mbps")):
        for cell in res[kind]:
            for p in cell["points"]:
                if p["median_ms"] and all_fell_back(p):
                    fallback += 1
                elif p["median_ms"]:
                    unit = "ms" if kind == "fig6" else "Mbps"
                    rows.append(_row(f"{kind} {cell['model']} {p[label]:.3g}{unit}", p, p["plan"]["predicted"]))
    errs = [r["rel_error"] for r in rows]
    return {"plans": len(rows), "median": med(errs), "p90": pct(errs, 0.9), "rows": rows, "fell_back": fallback}


def throughput_fidelity(res: dict[str, Any]) -> dict[str, Any]:
    """Measured / predicted throughput of every distinct heavy-load plan measured, with the
    predicted stages (device, uplink + rtt, edge) beside the measured per-frame terms."""
    lo, hi = THROUGHPUT_RATIO
    rows = []
    for cell in res["heavy"]:
        for k, v in cell["planners"].items():
            pred = v["plan"]["predicted"]
            if first_of_plan(k, v) and v["throughput_fps"] and pred.get("throughput_fps"):
                ratio = v["throughput_fps"] / pred["throughput_fps"]
                rows.append({"where": f"{cell['model']} {cell['network']} {k}",
                             "measured_fps": v["throughput_fps"], "predicted_fps": pred["throughput_fps"],
                             "ratio": ratio,
                             "predicted_terms": {t: pred[t] for t in ("device_ms", "transfer_ms", "edge_ms")},
                             "measured_terms": v.get("terms_ms", {}), "plan_kind": v["plan"]["kind"],
                             "frames": v["frames"], "fell_back": v["where"]["fallback"],
                             # within the band, and a measure of the plan (a stream all fallback is not)
                             "inside": lo <= ratio <= hi and not all_fell_back(v)})  # fmt: skip
    ratios = [r["ratio"] for r in rows]
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        r["bottleneck"] = bottleneck(r["predicted_terms"], r["predicted_fps"])
        by_stage.setdefault(r["bottleneck"], []).append(r)
    stages = {
        stage: {
            "plans": len(got),
            "inside": sum(r["inside"] for r in got),
            "median_ratio": med([r["ratio"] for r in got]),
        }
        for stage, got in sorted(by_stage.items())
    }
    inside = sum(r["inside"] for r in rows)
    return {"plans": len(rows), "inside": inside, "median_ratio": med(ratios), "rows": rows, "by_bottleneck": stages}


def bottleneck(terms: dict[str, float], predicted_fps: float) -> str:
    """The stage a heavy-load plan's predicted rate comes from: "device" or "edge" when that
    stage's predicted time is the predicted frame period (within 1 %), else "link" (the uplink:
    its time is not among the terms, which add the round trip to it). Link-bound plans pay the
    OIP v2 JSON header (about 160 bytes a request) that the cost model does not price, so they
    measure below their prediction by the header's share of what they send. O(1)."""
    period = 1000.0 / predicted_fps
    for stage in ("device", "edge"):
        if abs(terms[f"{stage}_ms"] - period) <= 0.01 * period:
            return stage
    return "link"


def format_target(t: dict[str, Any]) -> str:
    r = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
    return f"{'PASS' if t['pass'] else 'FAIL'}  {t['what']}: {r} {t['note']}".rstrip()
