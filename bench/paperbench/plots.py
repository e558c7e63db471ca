"""PNG plots of the paper bench's results (matplotlib, Agg backend). Each function draws one
figure from the results dict and returns the file name it wrote under `out` (None: no data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dapdee.bench.paperbench.plans import LABEL, PLANNERS


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def _bars(cells: list[dict[str, Any]], metric: str, ylabel: str, title: str, path: Path) -> str | None:
    """Grouped bars, one panel per model (up to 3 per row): one group per network, one bar per
    planner, log scale, so every panel keeps its own scale. O(cells x planners)."""
    if not cells:
        return None
    plt = _plt()
    models = list(dict.fromkeys(c["model"] for c in cells))
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows + 0.6), squeeze=False)
    width = 0.8 / len(PLANNERS)
    for ax, model in zip(axes.flat, models, strict=False):  # the grid may have spare panels
        group = [c for c in cells if c["model"] == model]
        for j, p in enumerate(PLANNERS):
            shift = (j - (len(PLANNERS) - 1) / 2) * width
            pts = [(i + shift, c["planners"][p].get(metric)) for i, c in enumerate(group)]
            pts = [(x, y) for x, y in pts if y]
            ax.bar([x for x, _ in pts], [y for _, y in pts], width, label=LABEL[p], color=f"C{j}")
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([c["network"] for c in group], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(model, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(PLANNERS), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def fig6(res: dict[str, Any], out: Path, slowdown: float) -> str | None:
    """Budget sweep: exit depth, latency (measured and predicted) and exit accuracy per budget."""
    if not res["fig6"]:
        return None
    from matplotlib.ticker import ScalarFormatter

    fig, axes = _plt().subplots(1, 3, figsize=(12, 3.6))
    for c in res["fig6"]:
        b = [p["budget_ms"] for p in c["points"]]
        axes[0].plot(b, [p["plan"]["exit_index"] for p in c["points"]], "o-", label=c["model"])
        axes[1].plot(b, [p["median_ms"] for p in c["points"]], "o-", label=f"{c['model']} measured")
        axes[1].plot(b, [p["plan"]["predicted"]["latency_ms"] for p in c["points"]], "x--",
                     label=f"{c['model']} predicted")  # fmt: skip
        axes[2].plot(b, [p["plan"]["exit_accuracy"] for p in c["points"]], "o-", label=c["model"])
    axes[0].set_ylabel("exit depth (1 = shallowest; last = final)")
    axes[1].set_ylabel("latency ms")
    axes[2].set_ylabel("exit accuracy (held-out)")
    net = res["fig6"][0]["network"]
    for ax in axes:
        ax.set_xlabel(f"latency budget ms ({net})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize=7)
    fig.suptitle(f"Figure 6 analogue: budget sweep at {net} (K={slowdown:g})", fontsize=10)
    return _save(fig, out / "paper_fig6_budget.png")


def _annotate_cuts(ax: Any, c: dict[str, Any], color: str) -> None:
    """Label each distinct mid-network cut of a sweep with the node(s) it ships and its bytes."""
    seen: set[tuple[str, ...]] = set()
    for p in c["points"]:
        pl = p["plan"]
        if pl["kind"] == "mid" and tuple(pl["sent_after"]) not in seen:
            seen.add(tuple(pl["sent_after"]))
            ax.annotate(f"{', '.join(pl['sent_after'])}: {pl['bytes']:,} B",
                        (p["bandwidth_mbps"], pl["device_nodes"] / pl["exit_nodes"]), fontsize=6, color=color,
                        xytext=(0, 6), textcoords="offset points", ha="center")  # fmt: skip


def fig7(res: dict[str, Any], out: Path) -> str | None:
    """Bandwidth sweep: the partition point (device share of the exit's nodes, mid cuts
    labelled), the bytes sent, and latency measured vs predicted, per model and its K."""
    if not res["fig7"]:
        return None
    fig, axes = _plt().subplots(1, 3, figsize=(13.5, 4.0))
    for i, c in enumerate(res["fig7"]):
        bw = [p["bandwidth_mbps"] for p in c["points"]]
        label, color = f"{c['model']} (K={c['slowdown']:g})", f"C{i}"
        share = [p["plan"]["device_nodes"] / p["plan"]["exit_nodes"] for p in c["points"]]
        axes[0].step(bw, share, where="mid", color=color, lw=0.8)
        axes[0].plot(bw, share, "o", color=color, label=label)
        _annotate_cuts(axes[0], c, color)
        axes[1].plot(bw, [max(p["plan"]["bytes"], 1) for p in c["points"]], "o-", color=color, label=label)
        axes[2].plot(bw, [p["median_ms"] for p in c["points"]], "o-", color=color, label=f"{label} measured")
        axes[2].plot(bw, [p["plan"]["predicted"]["latency_ms"] for p in c["points"]], "x--", color=color,
                     label=f"{label} predicted")  # fmt: skip
    axes[0].set_ylabel("partition point: device share of the exit's nodes")
    axes[0].set_ylim(-0.05, 1.15)
    axes[1].set_ylabel("bytes sent per frame (log; 1 = none)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("latency ms")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("uplink Mbit/s")
        ax.set_xscale("log")
        ax.legend(fontsize=6)
    fig.suptitle("Figure 7 analogue: the cut as the uplink sweeps, at a fixed budget (measured through the services)",
                 fontsize=10)  # fmt: skip
    return _save(fig, out / "paper_fig7_bandwidth.png")


def fidelity(res: dict[str, Any], out: Path, slowdown: float) -> str | None:
    """Predicted vs measured latency of every measured sequential plan."""
    rows = [(v["plan"]["predicted"]["latency_ms"], v["median_ms"])
            for c in res["light"] for v in c["planners"].values() if v["median_ms"]]  # fmt: skip
    rows += [(p["plan"]["predicted"]["latency_ms"], p["median_ms"])
             for key in ("fig6", "fig7") for c in res[key] for p in c["points"] if p["median_ms"]]  # fmt: skip
    if not rows:
        return None
    fig, ax = _plt().subplots(figsize=(4.6, 4.4))
    ax.scatter([r[0] for r in rows], [r[1] for r in rows], s=12)
    lo, hi = min(min(r) for r in rows) * 0.8, max(max(r) for r in rows) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted latency ms")
    ax.set_ylabel("measured median ms")
    ax.set_title(f"Prediction fidelity (K={slowdown:g}; camera Fig. 7 at its own K)", fontsize=9)
    return _save(fig, out / "paper_fidelity.png")


def adaptation(res: dict[str, Any], out: Path, slowdown: float) -> str | None:
    """Per-frame latency and the plan's prediction over time, the shaped and sensed uplink, and
    each phase's optimum plan (dashed)."""
    ad = res.get("adaptation")
    if not ad or not ad["frames"]:
        return None
    fig, ax = _plt().subplots(figsize=(8, 3.8))
    t = [f["t_s"] for f in ad["frames"]]
    ax.plot(t, [f["measured_ms"] for f in ad["frames"]], ".", ms=4, label="DAPDEE measured per frame")
    ax.step(t, [f["predicted_ms"] for f in ad["frames"]], where="post", lw=0.8, label="its plan's prediction")
    t0 = 0.0
    for ph in ad["phases"]:
        opt = ad["optimum"][ph["network"]]
        ax.hlines(opt.get("median_ms") or opt["plan"]["predicted"]["latency_ms"], t0, t0 + ph["seconds"],
                  colors="k", linestyles="--", lw=1)  # fmt: skip
        t0 += ph["seconds"]
    ax.set_yscale("log")
    ax.set_xlabel("time s")
    ax.set_ylabel("latency ms (dashed: optimum plan)")
    ax2 = ax.twinx()
    ax2.step(t, [f["rate_mbps"] for f in ad["frames"]], where="post", color="tab:red", lw=1, label="uplink")
    ax2.plot(t, [f["bandwidth_est_mbps"] for f in ad["frames"]], ":", color="tab:red", lw=1, label="estimate")
    ax2.set_yscale("log")
    ax2.set_ylabel("uplink Mbit/s", color="tab:red")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    phases = " -> ".join(p["network"] for p in ad["phases"])
    ax.set_title(f"Adaptation: {ad['model']}, {phases} (K={slowdown:g})", fontsize=10)
    return _save(fig, out / "paper_adaptation.png")


def make_plots(res: dict[str, Any], out: Path, slowdown: float) -> list[str]:
    """Write every plot the results allow; returns the file names (relative to `out`)."""
    names = [
        _bars(res["light"], "median_ms", "median latency (ms, log)",
              f"Light load: measured latency (K={slowdown:g})", out / "paper_light_latency.png"),
        _bars(res["heavy"], "throughput_fps", "frames/s (log)",
              f"Heavy load: measured throughput (K={slowdown:g})", out / "paper_heavy_throughput.png"),
        fig6(res, out, slowdown), fig7(res, out), fidelity(res, out, slowdown), adaptation(res, out, slowdown),
    ]  # fmt: skip
    return [n for n in names if n]
