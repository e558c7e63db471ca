"""PNG plots of `bench/paper.py`'s results (matplotlib, Agg backend). Each function draws one
figure from the results dict and returns the file name it wrote under `out`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLANNERS = ("device-only", "edge-only", "neurosurgeon", "dads", "edgent", "dapdee")
LABEL = {
    "device-only": "Device-Only",
    "edge-only": "Edge-Only",
    "neurosurgeon": "Neurosurgeon",
    "dads": "DADS",
    "edgent": "Edgent",
    "dapdee": "DAPDEE",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(cells: list[dict[str, Any]], metric: str, ylabel: str, title: str, path: Path, log: bool) -> None:
    """Grouped bars, one panel per model (up to 3 per row): one group per network, one bar per
    planner, so every panel keeps its own scale. O(cells x planners)."""
    plt = _plt()
    models = list(dict.fromkeys(c["model"] for c in cells))
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows + 0.6), squeeze=False)
    width = 0.8 / len(PLANNERS)
    for ax, model in zip(axes.flat, models, strict=False):  # the grid may have spare panels
        group = [c for c in cells if c["model"] == model]
        for j, p in enumerate(PLANNERS):
            xs, ys = [], []
            for i, c in enumerate(group):
                v = c["planners"][p].get(metric)
                if v:
                    xs.append(i + (j - (len(PLANNERS) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=LABEL[p], color=f"C{j}")
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([c["network"] for c in group], fontsize=8)
        if log:
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


def make_plots(res: dict[str, Any], out: Path, slowdown: float) -> list[str]:
    """Write every plot the results allow; returns the file names (relative to `out`)."""
    plt = _plt()
    from matplotlib.ticker import ScalarFormatter

    names: list[str] = []
    if res["light"]:
        _bars(
            res["light"],
            "median_ms",
            "median latency (ms, log)",
            f"Light load: measured latency (K={slowdown:g})",
            out / "paper_light_latency.png",
            True,
        )
        names.append("paper_light_latency.png")
    if res["heavy"]:
        _bars(
            res["heavy"],
            "throughput_fps",
            "frames/s (log)",
            f"Heavy load: measured throughput (K={slowdown:g})",
            out / "paper_heavy_throughput.png",
            True,
        )
        names.append("paper_heavy_throughput.png")
    if res["fig6"]:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for c in res["fig6"]:
            b = [p["budget_ms"] for p in c["points"]]
            depth = [p["plan"]["exit_index"] for p in c["points"]]
            axes[0].plot(b, depth, "o-", label=c["model"])
            axes[1].plot(b, [p["median_ms"] for p in c["points"]], "o-", label=f"{c['model']} measured")
            axes[1].plot(
                b,
                [p["plan"]["predicted"]["latency_ms"] for p in c["points"]],
                "x--",
                label=f"{c['model']} predicted",
            )
            axes[2].plot(b, [p["plan"]["exit_accuracy"] for p in c["points"]], "o-", label=c["model"])
        axes[0].set_ylabel("exit depth (1 = shallowest; last = final)")
        axes[1].set_ylabel("latency ms")
        axes[2].set_ylabel("exit accuracy (held-out)")
        for ax in axes:
            ax.set_xlabel("latency budget ms (3G)")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.legend(fontsize=7)
        fig.suptitle(f"Figure 6 analogue: budget sweep at 3G (K={slowdown:g})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "paper_fig6_budget.png", dpi=110)
        plt.close(fig)
        names.append("paper_fig6_budget.png")
    if res["fig7"]:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for c in res["fig7"]:
            bw = [p["bandwidth_mbps"] for p in c["points"]]
            axes[0].plot(bw, [p["plan"]["bytes"] for p in c["points"]], "o-", label=c["model"])
            axes[1].plot(bw, [p["plan"]["device_flops_frac"] for p in c["points"]], "o-", label=c["model"])
            axes[2].plot(bw, [p["median_ms"] for p in c["points"]], "o-", label=f"{c['model']} measured")
            axes[2].plot(
                bw,
                [p["plan"]["predicted"]["latency_ms"] for p in c["points"]],
                "x--",
                label=f"{c['model']} predicted",
            )
        axes[0].set_ylabel("bytes sent per frame")
        axes[1].set_ylabel("share of the exit's FLOPs on device")
        axes[2].set_ylabel("latency ms")
        for ax in axes:
            ax.set_xlabel("uplink Mbit/s")
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        fig.suptitle(f"Figure 7 analogue: bandwidth sweep at a fixed budget (K={slowdown:g})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "paper_fig7_bandwidth.png", dpi=110)
        plt.close(fig)
        names.append("paper_fig7_bandwidth.png")
    rows = []
    for c in res["light"]:
        for p in PLANNERS:
            v = c["planners"][p]
            if v["median_ms"]:
                rows.append((v["plan"]["predicted"]["latency_ms"], v["median_ms"]))
    for key in ("fig6", "fig7"):
        for c in res[key]:
            for p in c["points"]:
                if p["median_ms"]:
                    rows.append((p["plan"]["predicted"]["latency_ms"], p["median_ms"]))
    if rows:
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        ax.scatter([r[0] for r in rows], [r[1] for r in rows], s=12)
        lo = min(min(r) for r in rows) * 0.8
        hi = max(max(r) for r in rows) * 1.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted latency ms")
        ax.set_ylabel("measured median ms")
        ax.set_title(f"Prediction fidelity (K={slowdown:g})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "paper_fidelity.png", dpi=110)
        plt.close(fig)
        names.append("paper_fidelity.png")
    ad = res.get("adaptation")
    if ad and ad["frames"]:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        t = [f["t_s"] for f in ad["frames"]]
        ax.plot(t, [f["measured_ms"] for f in ad["frames"]], ".", ms=4, label="DAPDEE measured per frame")
        ax.step(
            t, [f["predicted_ms"] for f in ad["frames"]], where="post", lw=0.8, label="its plan's prediction"
        )
        t0 = 0.0
        for ph in ad["phases"]:
            opt = ad["optimum"][ph["network"]]
            y = opt.get("median_ms") or opt["plan"]["predicted"]["latency_ms"]
            ax.hlines(y, t0, t0 + ph["seconds"], colors="k", linestyles="--", lw=1)
            t0 += ph["seconds"]
        ax.set_yscale("log")
        ax.set_xlabel("time s")
        ax.set_ylabel("latency ms (dashed: optimum plan)")
        ax2 = ax.twinx()
        ax2.step(
            t, [f["rate_mbps"] for f in ad["frames"]], where="post", color="tab:red", lw=1, label="uplink"
        )
        ax2.plot(
            t, [f["bandwidth_est_mbps"] for f in ad["frames"]], ":", color="tab:red", lw=1, label="estimate"
        )
        ax2.set_yscale("log")
        ax2.set_ylabel("uplink Mbit/s", color="tab:red")
        ax.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="upper right")
        ax.set_title(
            f"Adaptation: {ad['model']}, "
            + " -> ".join(p["network"] for p in ad["phases"])
            + f" (K={slowdown:g})",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(out / "paper_adaptation.png", dpi=110)
        plt.close(fig)
        names.append("paper_adaptation.png")
    return names
