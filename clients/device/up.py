"""`dapdee up`: planner + edge worker + device runtime in one process on 127.0.0.1.

No Docker, no Redis: the planner runs with its in-process store, the edge worker serves the
shipped camera-size Fashion-MNIST artifact (224-px ResNet-18; else the 32-px one; else an
untrained width-0.25 ResNet-18, with a warning), both under uvicorn in threads on free ports,
closed by a random token of this run (`secrets.token_urlsafe`) that all three parts share. The
device, K = 30 x slower than this machine (about a Raspberry Pi's gap to an edge server),
streams real test images of the artifact's dataset (its manifest's `dataset`: Fashion-MNIST for
the shipped artifacts) over emulated 3G, 4G and WiFi uplinks. One table
compares, per network, the planner's choice (exit, cut, bytes) and its predicted latency with
the measured one, and the same for Device-Only; a second gives the cost model's reason for each
cut: the chosen plan's predicted device, uplink + round trip and edge ms beside the Device-Only
and Edge-Only predictions under the same sensed conditions. Which cut each network gets follows
this machine's profiles and the links as sensed: at 3G a mid cut and Device-Only come close to a
tie, so either may be chosen; the cut moves toward the edge as the uplink gets faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("dapdee.device.up")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ARTIFACTS = ("artifacts/fmnist-resnet18-224", "artifacts/fmnist-resnet18")
FALLBACK_SPEC = "zoo:resnet18?width=0.25&in_channels=1"
PROFILE_RUNS = 5  # whole runs per exit calibrating the device profile (the demo keeps start-up short)


@dataclass(frozen=True)
class UpOptions:
    artifact: str | None = None
    model: str = ""  # the spec the artifact's weights belong to ("": the manifest's zoo: spec)
    networks: tuple[str, ...] = ("3G", "4G", "WiFi")
    frames: int = 12
    slowdown: float = 30.0
    rtt_ms: float = 10.0
    mode: str = "auto"
    latency_budget_ms: float | None = None
    min_accuracy: float | None = None
    frame_rate: float | None = None
    confidence_exits: bool = False
    fp16: bool = False
    device_load: float | None = None
    load_source: str = "compute"
    log: str | None = None
    quiet: bool = False


def find_artifact(given: str | None) -> str | None:
    """The artifact to serve: `given`, else the first of DEFAULT_ARTIFACTS found (cwd, then the repo)."""
    if given:
        return given
    for name in DEFAULT_ARTIFACTS:
        for base in (Path.cwd(), REPO):
            p = base / name
            if (p / "manifest.json").is_file() and (p / "weights.safetensors").is_file():
                return str(p)
    return None


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


COLUMNS = [
    ("network", "network"),
    ("uplink", "Mbit/s"),
    ("est", "est Mbit/s"),
    ("load", "dev load"),
    ("exit", "exit"),
    ("cut", "cut dev/all"),
    ("kind", "cut kind"),
    ("bytes", "bytes/frame"),
    ("pred", "pred ms"),
    ("meas", "meas ms"),
    ("where", "edge/local/fb"),
    ("fps", "frames/s"),
    ("acc_exit", "exit acc"),
    ("acc", "acc frames"),
]


REASON_COLUMNS = [
    ("network", "network"),
    ("cut", "chosen cut"),
    ("after", "sent after"),
    ("device", "device ms"),
    ("transfer", "uplink+rtt ms"),
    ("edge", "edge ms"),
    ("total", "pred ms"),
    ("device_only", "Device-Only ms"),
    ("edge_only", "Edge-Only ms"),
]


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]] = COLUMNS) -> str:
    """A table of `rows` under `columns` (key, heading): by default the demo's comparison, one
    row per network condition + Device-Only."""
    body = [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    head = [h for _, h in columns]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [_row(head, widths), _row(["-" * w for w in widths], widths)]
    return "\n".join(lines + [_row(b, widths) for b in body])


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def row_of(name: str, rate: float | None, runtime: Any, records: list[Any], wall_s: float) -> dict[str, Any]:
    """One table row from a network's records."""
    from dapdee.device.report import summarize

    s = summarize(records)
    g = runtime.graph
    exits = Counter(r.exit for r in records).most_common()
    main_exit = exits[0][0] if exits else None
    # the cut is the plan's: with confidence exits a head may answer before the plan's exit
    planned = Counter(r.plan_exit for r in records).most_common()
    plan_exit = planned[0][0] if planned else None
    anc = len(g.ancestors(g.exit(plan_exit).node)) if plan_exit else 0
    where = s.get("where", {})
    cut = statistics.median(r.device_nodes for r in records if r.plan_exit == plan_exit) if plan_exit else None
    kind = "-" if cut is None else "device-only" if cut >= anc else "edge-only" if cut == 0 else "mid"
    return {
        "network": name,
        "uplink": "-" if rate is None else f"{rate:g}",
        "est": "-" if rate is None else f"{runtime.sensing.bandwidth_mbps:.3g}",
        "load": f"{statistics.fmean(r.device_load or 0.0 for r in records):.2f}" if records else "-",
        "exit": (main_exit or "-") + ("" if len(exits) <= 1 else f" (+{len(exits) - 1})"),
        "cut": "-" if cut is None else f"{cut:.0f}/{anc}",
        "kind": kind,
        "bytes": f"{s.get('bytes_sent_mean', 0):.0f}",
        "pred": _fmt(s.get("predicted_ms_mean")),
        "meas": _fmt(s.get("measured_ms_mean")),
        "where": f"{where.get('edge', 0)}/{where.get('local', 0)}/{where.get('fallback', 0)}",
        "fps": f"{len(records) / wall_s:.1f}" if wall_s > 0 else "-",
        "acc_exit": _fmt(g.exit(plan_exit).accuracy if plan_exit else None, ".3f"),
        "acc": _fmt(s.get("accuracy"), ".3f"),
    }


@dataclass
class Stack:
    """The demo's planner and edge worker, and the device's model and profile."""

    planner: Any
    edge: Any
    served: str
    spec: str
    artifact: str | None
    loaded: Any
    graph: Any
    token: str


def _stop_servers(*servers: Any) -> BaseException | None:
    """Stop every server in order, each even when an earlier one failed to stop; the first
    error (logged too), or None. O(servers)."""
    first: BaseException | None = None
    for server in servers:
        try:
            server.stop()
        except BaseException as exc:  # a Ctrl-C while stopping one still stops the rest
            log.error("stopping %s failed: %s", getattr(server, "url", server), exc)
            first = first or exc
    return first


def _start_stack(opts: UpOptions, say: Any, measure: Callable[..., Any] | None = None) -> Stack:
    """Planner and edge worker in threads (closed by one random token), the device's model
    (traced before the edge thread runs modules: fx tracing patches nn.Module process-wide) and
    its profile. Any failure (or Ctrl-C) on the way stops the servers already started before
    it propagates. `measure` takes the device profile, called as
    `dapdee.device.profile.measure_device_profile` is (None: that function); the tests pass one
    that fails there, as a Ctrl-C during profiling does."""
    from dapdee.device.profile import measure_device_profile
    from dapdee.edge_worker.app import OipHeadProtocol, load_models
    from dapdee.edge_worker.app import create_app as create_edge
    from dapdee.edge_worker.config import Settings as EdgeSettings
    from dapdee.models import load_model
    from dapdee.planner.app import create_app as create_planner
    from dapdee.planner.config import Settings as PlannerSettings
    from dapdee.planner.problems import ProblemHeadProtocol
    from dapdee.web.server_thread import ServerThread, bind_free_socket
    from dapdee.web.settings_load import load_settings

    measure = measure or measure_device_profile

    artifact = find_artifact(opts.artifact)
    if artifact is None:
        print(
            f"warning: none of {', '.join(DEFAULT_ARTIFACTS)} found; serving an UNTRAINED {FALLBACK_SPEC} "
            "(accuracies are chance level; train one with `dapdee train`)",
            file=sys.stderr,
        )
    token = secrets.token_urlsafe(24)
    started: list[Any] = []  # stopped last-started first
    try:
        ps = load_settings(PlannerSettings, "planner settings", redis_url=None, worker_ttl_s=10.0, api_token=token)
        planner = ServerThread(create_planner(ps), name="planner", http=ProblemHeadProtocol).start()
        started.insert(0, planner)
        sock = bind_free_socket()
        edge_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        es = load_settings(
            EdgeSettings, "edge worker settings", models=f"{opts.model}@{artifact}" if artifact else FALLBACK_SPEC,
            planner_url=planner.url, public_url=edge_url, port=sock.getsockname()[1], profile_repeats=8,
            profile_warmup=2, heartbeat_s=1.0, workers=1, api_token=token,
            self_url=edge_url,  # it measures its own per-request cost there, as `dapdee serve edge` does
        )  # fmt: skip
        served = load_models(es)
        spec = opts.model if artifact else FALLBACK_SPEC
        loaded = load_model(spec, weights=artifact)
        if artifact is None:  # untrained: the device holds the edge's (random) weights
            loaded.module.load_state_dict(served[0].module.state_dict())
        edge = ServerThread(create_edge(es, served), sock=sock, name="edge", http=OipHeadProtocol).start()
        started.insert(0, edge)
        say(f"planner {planner.url} (in-process store, no Redis); edge {edge_url} serving {served[0].name}")
        say(f"device: profiling {loaded.name} at slowdown K={opts.slowdown:g} ...")
        graph = measure(loaded, opts.slowdown, repeats=8, runs=PROFILE_RUNS)
    except BaseException:
        _stop_servers(*started)  # the start-up's error is the one to report
        raise
    return Stack(planner, edge, served[0].name, spec, artifact, loaded, graph, token)


def _frames(loaded: Any, n: int) -> tuple[list[Any], str]:
    """`n` labelled test images of the dataset the model's artifact was trained on (its
    manifest's `dataset`; Fashion-MNIST without one), prepared as its manifest says, and their
    description; seeded random inputs (with a warning) when the dataset cannot be read."""
    from dapdee.data import DataError
    from dapdee.device.frames import DatasetSource, FrameFormat, random_frames

    fmt = FrameFormat.of(loaded)
    dataset = (loaded.manifest or {}).get("dataset") or "fashion-mnist"
    try:
        source = DatasetSource(dataset, fmt, n)
        frames = list(source)
        if source.ref.text == "fashion-mnist":
            return frames, f"{len(frames)} Fashion-MNIST test images"
        return frames, source.describe()
    except DataError as exc:
        print(f"warning: {exc}; using random inputs", file=sys.stderr)
        return list(random_frames(fmt, n)), f"{n} random inputs (no labels)"


async def _reason(st: Stack, name: str, runtime: Any) -> dict[str, Any] | None:
    """The cost model's reason for the runtime's cut: its plan for the conditions it sensed last,
    re-asked with its stages, beside the Device-Only and Edge-Only plans (POST /plan with
    `baseline`) for the same conditions; baselines plan no confidence exits, so they are asked
    without them. None for a runtime without a planner."""
    from dapdee.client import AsyncPlannerClient
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.device.replanner import conditions

    if not isinstance(runtime.source, PlannerPlanSource):
        return None
    body = runtime.source.body(conditions(runtime.sensing))
    async with AsyncPlannerClient(st.planner.url, st.token, timeout=10.0) as planner:
        chosen = await planner.plan(body)
        plain = {k: v for k, v in body.items() if k != "confidence_exits"}
        alone = await planner.plan({**plain, "baseline": "device-only"})
        edge = await planner.plan({**plain, "baseline": "edge-only"})
    p, n = chosen.predicted, len(runtime.graph.ancestors(runtime.graph.exit(chosen.exit.name).node))
    after = ", ".join(t.node for t in chosen.transfer) if chosen.edge_nodes else "-"
    return {
        "network": name, "cut": f"{chosen.exit.name} {len(chosen.device_nodes)}/{n}", "after": after,
        "device": f"{p.device_ms:.1f}", "transfer": f"{p.transfer_ms:.1f}", "edge": f"{p.edge_ms:.1f}",
        "total": f"{p.latency_ms:.1f}", "device_only": f"{alone.predicted.latency_ms:.1f}",
        "edge_only": f"{edge.predicted.latency_ms:.1f}",
    }  # fmt: skip


async def _one_network(
    st: Stack, opts: UpOptions, name: str, rate: float | None, frames: list[Any], log_file: IO[str] | None
) -> tuple[dict[str, Any], dict[str, Any] | None, list[Any]]:
    """Stream `frames` on one emulated uplink (None: the Device-Only baseline), each frame's
    record written to the --log file as it finishes (an interrupted run keeps what it did): the
    table row, the cost model's reason for the cut, the records."""
    import torch
    from tqdm import tqdm

    from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig, default_tier
    from dapdee.device.report import jsonl_line
    from dapdee.device.session import DeviceSettings, open_device

    req = Requirements(opts.latency_budget_ms, opts.min_accuracy, opts.frame_rate, opts.mode, opts.confidence_exits)
    tier = default_tier(opts.slowdown, torch.get_num_threads())  # the threads `cmd_up` set, the profile's too
    planner = PlannerConfig(st.planner.url, tier, st.token, st.token, ready_timeout_s=60.0)
    settings = DeviceSettings(
        runtime=RuntimeConfig(req, fp16=opts.fp16), planner=planner, model=st.spec, weights=st.artifact,
        slowdown=opts.slowdown, rate_mbps=rate, rtt_ms=opts.rtt_ms, device_load=opts.device_load,
        load_source=opts.load_source, device_only=rate is None,
    )  # fmt: skip
    async with open_device(settings, st.loaded, st.graph) as runtime:
        t0 = time.perf_counter()
        with tqdm(total=len(frames), desc=name, file=sys.stderr, disable=opts.quiet, leave=False) as bar:

            def on_frame(rec: Any) -> None:
                bar.update(1)
                if log_file is not None:
                    log_file.write(jsonl_line(rec))

            records = await runtime.run(frames, progress=on_frame)
        wall_s = time.perf_counter() - t0
        reason = await _reason(st, name, runtime)
    return row_of(name, rate, runtime, records, wall_s), reason, records


def _footer(opts: UpOptions, wall: float) -> str:
    if opts.device_load is not None:
        load = f"fixed at {opts.device_load:g}; "
    elif opts.load_source == "proc":
        load = "share of CPUs used by other processes (/proc/stat); "
    else:
        load = "share of the emulated device's time lost to other work (see ComputeLoadMonitor); "
    return (
        "exit (+n) = the most used exit, n others too; "
        "cut = device nodes / nodes the plan's exit needs (mid: both sides compute); "
        "exit acc = that exit's accuracy; pred = planner's predicted latency "
        "(cost model: device + uplink + round trip + edge, with each side's per-request cost); "
        "meas = measured here (from a frame's start to its answer); frames/s = the stream's rate; "
        f"dev load = {load}{wall:.1f} s in all"
    )


def _run_networks(
    st: Stack, opts: UpOptions, nets: list[Any], log_file: IO[str] | None
) -> tuple[list[Any], list[Any], list[Any], str]:
    """Stream the frames on every network, then the Device-Only baseline (each frame to the
    --log file as it finishes), and stop the servers
    (the edge, then the planner, each even when another failed to stop; the first error wins):
    the table rows, the cut reasons, the frame records and the frames' description."""
    try:
        frames, source = _frames(st.loaded, opts.frames)

        async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Any]]:
            rows, reasons, records = [], [], []
            for name, rate in [(n.name, n.rate_mbps) for n in nets] + [("Device-Only", None)]:
                row, reason, recs = await _one_network(st, opts, name, rate, frames, log_file)
                rows.append(row)
                reasons += [reason] if reason else []
                records += recs
            return rows, reasons, records

        from dapdee.device.commands import until_terminated

        rows, reasons, records = asyncio.run(until_terminated(main()))  # SIGTERM ends it as Ctrl-C does
    except BaseException:
        _stop_servers(st.edge, st.planner)
        raise
    error = _stop_servers(st.edge, st.planner)
    if error is not None:
        raise error
    return rows, reasons, records, source


def run_up(opts: UpOptions) -> int:
    """Start everything, stream the frames per network, print the table, stop everything. The
    --log file is opened first: one that cannot be written is an error before anything starts."""
    from dapdee.device.report import open_log
    from dapdee.netem import parse_network

    t_start = time.monotonic()
    nets = [parse_network(n) for n in opts.networks]
    say = (lambda *a: None) if opts.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    with open_log(opts.log) if opts.log else contextlib.nullcontext() as log_file:
        st = _start_stack(opts, say)
        rows, reasons, records, source = _run_networks(st, opts, nets, log_file)
    mode = opts.mode + (f", {opts.frame_rate:g} fps" if opts.frame_rate else "")
    mode += ", confidence exits" if opts.confidence_exits else ""
    what = "artifact " + st.artifact if st.artifact else "untrained"
    print(
        f"DAPDEE all-in-one: {st.served} ({what}), {source}; device K={opts.slowdown:g}x slower than this machine; "
        f"uplinks shaped by token bucket, rtt {opts.rtt_ms:g} ms; mode {mode}"
    )
    print(format_table(rows))
    if reasons:
        print("\nwhy these cuts (the cost model, at each network's last sensed conditions):")
        if opts.confidence_exits:
            print(
                "(confidence exits: pred ms is a plan's latency when no head answers, a frame a confident head "
                "answers ends sooner; the baselines plan without them)"
            )
        print(format_table(reasons, REASON_COLUMNS))
    print(_footer(opts, time.monotonic() - t_start))
    return 0
