"""What the paper bench measures: the models, the networks, frame counts, caps and sweeps, from
the command line (`build_options`). Every field goes into the cache keys of the cells it shapes."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dapdee.netem import NETWORKS, parse_network

REPO = Path(__file__).resolve().parents[2]

# display key -> artifact directory (relative to the repository)
MODELS: dict[str, str] = {
    "alexnet": "artifacts/fmnist-alexnet",
    "vgg16": "artifacts/fmnist-vgg16",
    "resnet18": "artifacts/fmnist-resnet18",
    "inception": "artifacts/fmnist-inception",
    "resnet18-224": "artifacts/fmnist-resnet18-224",
}
DAG_MODELS = ("resnet18", "inception", "resnet18-224")
# The paper's 9.9x figure is for its 32-px inputs; at camera-frame size the uplink bounds every
# plan far below it, so that line informs. Camera-size models are swept in Fig. 7 at their own K.
CAMERA_SIZE = ("resnet18-224",)
EXPERIMENTS = ("light", "heavy", "fig6", "fig7", "adapt")
ACC_CLASS = 0.012  # accuracy loss vs the final exit allowed ("accuracy class")
MAX_INFLIGHT = 32  # frames in flight to fill a plan's pipeline under heavy load, at most
FULL_FIG7 = [0.1, 0.13, 0.3, 0.6, 1.1, 2.5, 5.85, 10.0, 18.88, 20.0]
CAMERA_K = 30.0  # the camera-size models' Fig. 7 device factor (about a Raspberry Pi's gap to an edge server)


def sweep_points(lo: float, hi: float, n: int) -> list[float]:
    """`n` log-spaced uplinks from `lo` to `hi` Mbit/s (3 significant digits) with the named
    networks between them: a cut that is optimal over a band of bandwidths is not stepped over."""
    grid = {float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)}
    return sorted(grid | {r for r in NETWORKS.values() if lo <= r <= hi})


CAMERA_FIG7 = sweep_points(1.0, 50.0, 36)


@dataclass
class Options:
    """Everything that determines what is measured (all of it goes into cell keys)."""

    models: list[str]
    networks: list[str]
    slowdown: float = 10.0
    rtt_ms: float = 20.0
    light_frames: int = 20  # per plan, split over `rounds`
    heavy_frames: int = 60
    heavy_min_s: float = 2.0  # a heavy-load round streams for at least this long
    rounds: int = 2
    # rounds of one plan whose throughputs (heavy) or medians (light) differ by more than this
    # factor get one tie-break round, and the plan's number is the median of its rounds
    tiebreak_ratio: float = 1.2
    plan_cap_s: float = 30.0  # wall-clock cap of one plan's measurement in one round
    heavy_factor: float = 20.0  # offered frame rate = factor x Device-Only's predicted fps
    max_inflight: int = 4
    fig6_points: int = 7
    fig6_network: str = "3G"
    fig7_bandwidths: list[float] = field(default_factory=lambda: list(FULL_FIG7))
    fig7_budget_frac: float = 1.0  # budget = frac x Device-Only latency of the final exit
    fig7_k: dict[str, float] = field(default_factory=lambda: {m: CAMERA_K for m in CAMERA_SIZE})  # model -> K
    camera_bandwidths: list[float] = field(default_factory=lambda: list(CAMERA_FIG7))
    fig_frames: int = 6
    adapt_model: str | None = None
    adapt_mode: str = "auto"  # auto: latency mode unless no model's latency optimum changes
    only: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    adapt_phases: list[tuple[str, float]] = field(default_factory=list)
    profile_repeats: int = 7
    profile_passes: int = 5  # whole device profiles 1 s apart, and the worker's start-up bursts: median kept
    probe_rounds: int = 6
    out: str = "bench/results"
    fresh: bool = False
    plots: bool = True
    quiet: bool = False
    # (the edge worker's CPUs, everything else's) when they are kept apart (`cpu_split`); None: shared
    cpu_split: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    variant: str = "full"
    artifacts: dict[str, str] = field(default_factory=dict)  # model key -> directory override

    def artifact(self, m: str) -> Path:
        """The artifact directory of model key `m`."""
        return Path(self.artifacts.get(m) or REPO / MODELS[m])

    def fig7_slowdown(self, m: str) -> float:
        """The device factor K of model `m`'s Fig. 7 sweep (`fig7_k`, else the bench's K)."""
        return self.fig7_k.get(m, self.slowdown)

    def fig7_points(self, m: str) -> list[float]:
        """The uplinks (Mbit/s) of model `m`'s Fig. 7 sweep."""
        return self.camera_bandwidths if m in CAMERA_SIZE else self.fig7_bandwidths


def cpu_split() -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(the edge worker's CPUs, everything else's): the last CPU this process may run on for the
    worker, the others for the emulated device (its compute, uplink shaping and HTTP), as if each
    had a machine of its own; None with fewer than 2 CPUs. On a shared 2-core host a fast
    stream's device client and worker otherwise take turns on both cores, and the stream runs at
    the pace of the shared CPU, which no cost model of two machines prices. O(CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    return ((cpus[-1],), tuple(cpus[:-1])) if len(cpus) >= 2 else None


def smoke_options() -> Options:
    """The test's variant: AlexNet at 4G, two frames per plan, tiny sweeps (well under a minute)."""
    return Options(
        models=["alexnet"],
        networks=["4G"],
        light_frames=2,
        heavy_frames=10,
        heavy_min_s=0.3,
        plan_cap_s=4.0,
        fig6_points=2,
        fig7_bandwidths=[1.1, 18.88],
        fig7_k={"alexnet": CAMERA_K},  # a second device tier, as the camera-size sweep has
        fig_frames=1,
        adapt_phases=[("4G", 1.5), ("CAT1", 1.5), ("3G", 1.5)],
        profile_repeats=3,
        profile_passes=1,
        probe_rounds=3,
        tiebreak_ratio=1.0,  # every plan whose rounds differ at all gets its tie-break round
        variant="smoke",
    )


def quick_options() -> Options:
    """AlexNet and the camera-size ResNet-18 (its Fig. 7 at K = 30) at 3G and 4G: minutes."""
    return Options(
        models=["alexnet", "resnet18-224"],
        networks=["3G", "4G"],
        light_frames=10,
        heavy_frames=30,
        heavy_min_s=1.0,
        plan_cap_s=8.0,
        fig6_points=4,
        fig7_bandwidths=[0.1, 1.1, 5.85, 20.0],
        camera_bandwidths=sweep_points(1.5, 40.0, 24),
        fig_frames=3,
        adapt_phases=[("4G", 8.0), ("CAT1", 8.0), ("3G", 8.0)],
        profile_repeats=5,
        profile_passes=3,
        variant="quick",
    )


def full_options() -> Options:
    """Every model at CAT1, 3G, 4G and WiFi (about a quarter of an hour on 2 cores)."""
    return Options(
        models=list(MODELS),
        networks=["CAT1", "3G", "4G", "WiFi"],
        adapt_phases=[("4G", 20.0), ("CAT1", 20.0), ("3G", 20.0)],
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/paper.py",
        description="The DAPDEE paper's evaluation through the real planner, edge worker and device runtime.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 models, 2 networks, a few frames (minutes)")
    size.add_argument("--smoke", action="store_true", help="1 model, 1 network, 2 frames (the test's variant)")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--networks", help="comma list of CAT1, 3G, 4G, WiFi")
    p.add_argument("--slowdown", "-K", type=float, default=10.0, help="device slowdown K (default 10)")
    p.add_argument(
        "--fig7-k",
        action="append",
        default=[],
        metavar="MODEL=K",
        help=f"device factor K of a model's Fig. 7 sweep (default {CAMERA_K:g} for {', '.join(CAMERA_SIZE)})",
    )
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--frames", type=int, help="light-load frames per plan")
    p.add_argument("--heavy-frames", type=int)
    p.add_argument("--fig-frames", type=int)
    p.add_argument("--plan-cap-s", type=float, help="wall-clock cap per plan measurement and round")
    p.add_argument("--heavy-factor", type=float, default=20.0)
    p.add_argument("--out", help="output directory (default bench/results, bench/results/quick for --quick)")
    p.add_argument("--fresh", action="store_true", help="ignore cached cells and profiles (re-measure both)")
    p.add_argument("--artifact", action="append", default=[], metavar="MODEL=DIR",
                   help="use another artifact directory for a model key (repeatable)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--only", help=f"comma list of experiments to run: {', '.join(EXPERIMENTS)} (default all)")
    p.add_argument("--adapt-model", choices=list(MODELS), help="adaptation model (default: chosen)")
    p.add_argument("--adapt-mode", choices=["auto", "latency", "throughput"], default="auto",
                   help="adaptation mode (auto: latency unless no model's latency optimum changes)")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="the edge worker shares every CPU with the device and planner (default: a CPU of its own)",
    )
    return p


def _names(text: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad:
        raise SystemExit(f"--{what}: unknown {bad}; expected some of {', '.join(known)}")
    return names


def build_options(argv: list[str] | None = None) -> Options:
    """The options of a command line (SystemExit naming the argument when one is bad)."""
    a = _parser().parse_args(argv)
    o = smoke_options() if a.smoke else quick_options() if a.quick else full_options()
    if a.models:
        o.models = _names(a.models, list(MODELS), "models")
    if a.networks:
        try:
            o.networks = [parse_network(n.strip()).name for n in a.networks.split(",") if n.strip()]
        except ValueError as exc:
            raise SystemExit(f"--networks: {exc}") from None
    o.slowdown, o.rtt_ms, o.heavy_factor = a.slowdown, a.rtt_ms, a.heavy_factor
    for name in ("light_frames", "heavy_frames", "fig_frames", "plan_cap_s"):
        given = getattr(a, "frames" if name == "light_frames" else name)
        if given:
            setattr(o, name, given)
    default_out = REPO / "bench" / "results" / ("" if o.variant == "full" else o.variant)
    o.out, o.fresh, o.plots, o.quiet = a.out or str(default_out), a.fresh, not a.no_plots, a.quiet
    o.cpu_split = None if a.no_pin else cpu_split()
    if a.only:
        o.only = _names(a.only, EXPERIMENTS, "only")
    o.adapt_model, o.adapt_mode = a.adapt_model, a.adapt_mode
    for key, path in _pairs(a.artifact, "artifact", "DIR"):
        o.artifacts[key] = str(Path(path).resolve())
    for key, k in _pairs(a.fig7_k, "fig7-k", "K"):
        try:
            o.fig7_k[key] = float(k)
        except ValueError:
            raise SystemExit(f"--fig7-k: K must be a number >= 1, got {k!r}") from None
        if not o.fig7_k[key] >= 1:
            raise SystemExit(f"--fig7-k: K must be a number >= 1, got {k!r}")
    return o


def _pairs(items: list[str], what: str, value: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, v = item.partition("=")
        if not sep or key not in MODELS or not v:
            raise SystemExit(f"--{what}: expected MODEL={value} with MODEL one of {', '.join(MODELS)}")
        out.append((key, v))
    return out


def available_models(o: Options) -> tuple[list[str], dict[str, str]]:
    """The selected models whose artifacts exist, and why the others were skipped."""
    ok, skipped = [], {}
    for m in o.models:
        d = o.artifact(m)
        if (d / "manifest.json").is_file() and (d / "weights.safetensors").is_file():
            ok.append(m)
        else:
            skipped[m] = f"artifact {d} not found"
    return ok, skipped


def artifact_id(d: Path) -> str:
    """A short identity of an artifact (its weights' sha256 from the manifest, else the
    manifest's mtime), so cells of a re-trained artifact are not taken from the cache."""
    try:
        sha = json.loads((d / "manifest.json").read_text()).get("weights_sha256")
        if isinstance(sha, str) and sha:
            return sha[:12]
    except (OSError, ValueError):
        pass
    return f"m{int((d / 'manifest.json').stat().st_mtime)}"
