"""`dapdee device run` (the device runtime against a planner and edge workers) and `dapdee up`
(planner + edge worker + device in one process, the README's `make demo`).

Process-wide settings (torch threads, logging, the metrics server) are made here, by the
command line, never by the library classes it assembles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from dapdee.cli import (
    ARTIFACT_MODEL_HELP,
    Terminated,
    check_slowdown,
    float_in,
    positive_float,
    positive_int,
    thread_count,
)
from dapdee.names import check_model_name
from dapdee.planning.request import MAX_BUDGET_MS, MAX_FRAME_RATE

MAX_EMULATED_RTT_MS = 60000.0  # the emulator waits this per request: more would only hang the run
T = TypeVar("T")


def _load_arg(text: str) -> float:
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a load in [0, 1), got {text!r}")
    return v


def _accuracy(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected an accuracy in [0, 1], got {text!r}")
    return v


def _port(text: str) -> int:
    v = positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {text!r}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    # checked by `check_slowdown` when the command runs: one line naming it, as for `dapdee up`
    p.add_argument("--slowdown", type=float, default=10.0, help="K: the device is K x slower than this machine")
    rtt = float_in(0.0, MAX_EMULATED_RTT_MS)
    p.add_argument("--rtt-ms", type=rtt, default=10.0, help="added round trip of the emulated network (ms)")
    p.add_argument(
        "--frame-rate", type=float_in(0.0, MAX_FRAME_RATE, low_open=True),
        help="frames per second to sustain (heavy load: pipelined)",
    )  # fmt: skip
    p.add_argument("--latency-budget-ms", type=float_in(0.0, MAX_BUDGET_MS, low_open=True))
    p.add_argument("--min-accuracy", type=_accuracy)
    p.add_argument("--mode", choices=("auto", "latency", "throughput"), default="auto")
    p.add_argument("--fp16", action="store_true", help="send boundary tensors as FP16")
    p.add_argument(
        "--confidence-exits",
        action="store_true",
        help="plan with the artifact's calibrated confidence exits and stop each frame at the first confident "
        "head (on the device, or on the edge); needs thresholds (`dapdee calibrate`)",
    )
    p.add_argument("--device-load", type=_load_arg, help="fixed device load (default: measured)")
    p.add_argument(
        "--load-source",
        choices=("proc", "compute"),
        help="how to measure device load: proc = other processes' CPU share (/proc/stat; device run's "
        "default), compute = share of the device thread's wall time lost to other work (up's default)",
    )
    # the default is dapdee.device.config.DEFAULT_THREADS (that module is not imported to build the parser)
    p.add_argument("--threads", type=thread_count, default=1, help="torch CPU threads of the device (default 1)")
    p.add_argument("--log", metavar="FILE", help="write one JSON line per frame")


def _run_parser(dsub: Any) -> None:
    r = dsub.add_parser(
        "run",
        help="stream frames: plan, run the device part, ship tensors to the edge, fall back locally",
        description="Each record states the shaped uplink rate and the device slowdown K.",
    )
    r.add_argument("--planner", metavar="URL", help="planner base URL, e.g. http://127.0.0.1:8100")
    r.add_argument("--plan", metavar="JSON", help="a fixed plan (a plan JSON file) instead of a planner; needs --edge")
    r.add_argument("--model", default="", metavar="SPEC_OR_NAME", help="zoo:NAME?opt=v, pkg.mod:factory or a name")
    r.add_argument("--weights", metavar="ARTIFACT", help="artifact directory (the one the edge serves)")
    r.add_argument("--network", default=None, help="shape the uplink: CAT1, 3G, 4G, WiFi or Mbit/s (default: none)")
    r.add_argument("--frames", type=positive_int, help="number of frames (random inputs, or the first N of --source)")
    r.add_argument(
        "--source",
        help="what to classify: an image folder (DIR/<class>/<image> gives labels), a video file, a camera "
        "(/dev/videoN), or a dataset's test images (fashion-mnist, cifar10:DIR); default: random inputs",
    )
    r.add_argument("--edge", metavar="URL", help="edge worker URL (default: the one the plan names)")
    r.add_argument(
        "--device-tier",
        help="name of this device's profile at the planner (default device-kK, e.g. device-k10; with --threads N "
        "other than 1, device-kK-tN: another thread count computes at another speed)",
    )
    r.add_argument("--device-id", help="this device's id: its plans hold a lease (needs --frame-rate)")
    r.add_argument("--profile", metavar="JSON", help="device profile file: loaded if present, else measured into it")
    r.add_argument("--token", help="device token for plans and infer (default $DAPDEE_DEVICE_TOKEN, $DAPDEE_API_TOKEN)")
    r.add_argument("--admin-token", help="admin token, only to upload the device profile (default $DAPDEE_ADMIN_TOKEN)")
    r.add_argument("--plan-max-age-s", type=positive_float, default=10.0)
    r.add_argument("--max-inflight", type=positive_int, default=3, help="frames in flight when pipelining")
    r.add_argument("--ready-timeout-s", type=positive_float, default=30.0, help="wait for the edge to register")
    r.add_argument("--device-only", action="store_true", help="baseline: no planner or edge")
    r.add_argument("--metrics-port", type=_port, help="serve Prometheus metrics on this port")
    r.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics server (default 127.0.0.1)")
    r.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), help="stderr logging")
    r.add_argument("--log-format", choices=("json", "text"), default="json", help="with --log-level: line format")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    from dapdee.web.otel import add_otel_argument

    add_otel_argument(r)
    _common(r)
    r.set_defaults(func=cmd_run)


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("device", help="the device runtime")
    dsub = d.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    _run_parser(dsub)
    u = sub.add_parser(
        "up",
        help="all in one: planner + edge worker + device on 127.0.0.1 (no Docker, no Redis), emulated networks",
    )
    from dapdee.device.up import DEFAULT_ARTIFACTS, UpOptions

    u.add_argument("--artifact", help=f"artifact to serve (default {DEFAULT_ARTIFACTS[0]})")
    u.add_argument("--model", default="", help=ARTIFACT_MODEL_HELP)
    u.add_argument("--networks", default=",".join(UpOptions.networks), help="comma-separated CAT1,3G,4G,WiFi or Mbit/s")
    u.add_argument(
        "--frames", type=positive_int, default=UpOptions.frames, help="test images per network (the artifact's dataset)"
    )
    u.add_argument("--quiet", action="store_true")
    _common(u)
    u.set_defaults(func=cmd_up, slowdown=UpOptions.slowdown)  # the camera-size demo's device factor


def _tokens(args: argparse.Namespace) -> tuple[str | None, str | None]:
    env = os.environ
    token = args.token or env.get("DAPDEE_DEVICE_TOKEN") or env.get("DAPDEE_API_TOKEN") or None
    admin = args.admin_token or env.get("DAPDEE_ADMIN_TOKEN") or env.get("DAPDEE_API_TOKEN") or None
    return token, admin


def settings_of(args: argparse.Namespace) -> Any:
    """The `DeviceSettings` of `dapdee device run`'s arguments; ValueError naming a bad one."""
    from dapdee.device.config import (
        PlannerConfig,
        Requirements,
        RuntimeConfig,
        check_profile_path,
        check_url,
        default_tier,
    )
    from dapdee.device.session import DeviceSettings
    from dapdee.netem import parse_network

    check_slowdown(args.slowdown)
    if args.source is not None and not args.source.strip():
        raise ValueError(
            "--source: empty; name an image folder, a video file, a camera (/dev/videoN) or a dataset, "
            "or leave --source out for random inputs"
        )
    if args.profile is not None:
        check_profile_path("--profile", args.profile)  # a profile measured and then not kept is lost work
    if args.edge is not None:
        check_url("--edge", args.edge)
    if not args.model and not args.weights:
        raise ValueError("give --model SPEC_OR_NAME or --weights ARTIFACT")
    if not (args.planner or args.plan or args.device_only):
        raise ValueError("give --planner URL, or --plan JSON with --edge URL, or --device-only")
    if args.plan and not args.edge:
        raise ValueError("--plan needs --edge URL (the worker that runs the plan's edge part)")
    if args.confidence_exits and args.device_id:
        raise ValueError("--confidence-exits: plans made with confidence exits hold no lease; drop --device-id")
    if args.device_id and not args.frame_rate:
        raise ValueError("--device-id needs --frame-rate (the lease reserves frame rate x the edge cost)")
    for flag, name in (("--device-id", args.device_id), ("--device-tier", args.device_tier)):
        if name is not None:
            check_model_name(name, flag)
    net = parse_network(args.network) if args.network else None
    req = Requirements(args.latency_budget_ms, args.min_accuracy, args.frame_rate, args.mode, args.confidence_exits)
    runtime = RuntimeConfig(req, args.max_inflight, args.fp16, plan_max_age_s=args.plan_max_age_s)
    token, admin = _tokens(args)
    planner = None
    if args.planner and not args.plan:
        tier = args.device_tier or default_tier(args.slowdown, args.threads)
        planner = PlannerConfig(args.planner, tier, token, admin, args.device_id, ready_timeout_s=args.ready_timeout_s)
    plan_json = _plan_file(args.plan) if args.plan else None
    return DeviceSettings(
        runtime=runtime, planner=planner, model=args.model, weights=args.weights, slowdown=args.slowdown,
        rate_mbps=net.rate_mbps if net else None, rtt_ms=args.rtt_ms if net else 0.0,
        device_load=args.device_load, load_source=args.load_source or "proc", profile_path=args.profile,
        edge_url=args.edge, plan_json=plan_json, device_only=args.device_only, token=token,
    )  # fmt: skip


def _plan_file(path: str) -> Any:
    """The JSON of the `--plan` file; ValueError naming it when it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise ValueError(f"--plan {path!r}: cannot read it ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bytes that are not text, nesting too deep
        raise ValueError(f"--plan {path!r}: not a JSON plan ({type(exc).__name__}: {exc})") from None


def _observability(args: argparse.Namespace) -> tuple[Any, Any]:
    """Logging, metrics server and tracing as the arguments ask: (metrics or None, tracing)."""
    from dapdee.device.metrics import DeviceMetrics, serve_metrics
    from dapdee.web.logs import configure_logging
    from dapdee.web.otel import tracer

    if args.log_level:
        configure_logging("device", args.log_format, args.log_level)
    metrics = None
    if args.metrics_port:
        metrics = DeviceMetrics()
        try:
            serve_metrics(metrics, args.metrics_port, args.metrics_host)
        except OSError as exc:  # the port taken, or a host that does not resolve
            where = f"{args.metrics_host}:{args.metrics_port}"
            raise ValueError(f"--metrics-port: cannot serve on {where} ({exc.strerror or exc})") from None
    return metrics, tracer("device", args.otel)


async def until_terminated(coro: Coroutine[Any, Any, T]) -> T:
    """`coro`, ended by SIGTERM as Ctrl-C ends it: cancelled, so its `async with` blocks close
    (the device releases its lease at once instead of leaving it to expire), then `Terminated`
    (exit 143). A container's stop and systemd send SIGTERM. Where the loop cannot take signal
    handlers (not the main thread, Windows), SIGTERM keeps its default."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):
        return await coro
    try:
        return await coro
    except asyncio.CancelledError:
        if terminated:
            raise Terminated("terminated (SIGTERM)") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def cmd_run(args: argparse.Namespace) -> int:
    import contextlib
    import time

    import torch
    from tqdm import tqdm

    from dapdee.device.frames import FrameFormat, open_source, random_frames
    from dapdee.device.report import jsonl_line, open_log, summarize
    from dapdee.device.session import open_device

    settings = settings_of(args)
    torch.set_num_threads(args.threads)
    metrics, tracing = _observability(args)
    endless = bool(args.source and args.source.startswith("/dev/video") and not args.frames)  # a camera

    async def main(log: Any) -> tuple[Any, list, float, Any]:
        async with open_device(settings, metrics=metrics, tracing=tracing) as runtime:
            fmt = FrameFormat.of(runtime.compute.loaded)  # open_device computes with TorchCompute
            source = open_source(args.source, fmt, args.frames) if args.source else None
            frames = source if source is not None else random_frames(fmt, args.frames or 20)
            t0 = time.monotonic()
            with tqdm(total=args.frames, desc="frames", file=sys.stderr, disable=args.quiet, leave=False) as bar:

                def on_frame(rec: Any) -> None:
                    bar.update(1)
                    if log is not None:
                        log.write(jsonl_line(rec))  # as frames finish: an endless stream logs too

                records = await runtime.run(frames, progress=on_frame, keep=not endless)
            return runtime, records or list(runtime.records), time.monotonic() - t0, source

    try:
        with open_log(args.log) if args.log else contextlib.nullcontext() as log:
            runtime, records, wall, source = asyncio.run(until_terminated(main(log)))
    finally:
        tracing.shutdown()
    # an endless stream keeps only the last frames: the frame count and throughput are the run's
    summary = summarize(records, wall, frames=runtime.frames_done if endless else None)
    _print_run(args, settings, runtime, summary, records, source)
    return 0


def _print_run(args: argparse.Namespace, settings: Any, runtime: Any, s: dict, records: list, source: Any) -> None:
    from dapdee.device.report import format_records_table

    link = (
        f"uplink {settings.rate_mbps:g} Mbit/s shaped, rtt +{args.rtt_ms:g} ms"
        if settings.rate_mbps
        else "uplink not shaped"
    )
    print(
        f"model {runtime.graph.model}; device K={args.slowdown:g}x slower than this machine; {link}; mode {args.mode}"
    )
    if not records:
        print("no frames")
        return
    print(format_records_table(records, limit=20))
    acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
    print(
        f"frames {s['frames']}  where {s['where']}  exits {s['exits']}  "
        f"pred {s['predicted_ms_mean'] or 0:.1f} ms  meas {s['measured_ms_mean']:.1f} ms "
        f"(p50 {s['measured_ms_p50']:.1f}, p95 {s['measured_ms_p95']:.1f})  "
        f"{s['throughput_fps']:.1f} fps  accuracy {acc}  "
        f"bandwidth est {runtime.sensing.bandwidth_mbps:.3g} Mbit/s  plans {len(runtime.plans)}"
    )
    if s["frames_summarised"] < s["frames"]:
        print(f"latencies, places, exits and accuracy over the last {s['frames_summarised']} frames")
    if source is not None and source.stats.skipped:
        print(f"frames skipped by the source: {source.stats.skipped} ({'; '.join(source.stats.reasons[:3])})")
    for e in runtime.events[-10:]:
        print(f"  {e}")


def cmd_up(args: argparse.Namespace) -> int:
    import logging

    import torch

    from dapdee.device.up import UpOptions, run_up

    check_slowdown(args.slowdown)
    nets = tuple(n.strip() for n in args.networks.split(",") if n.strip())
    if not nets:
        raise ValueError("--networks: give at least one network")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("dapdee.edge", "dapdee.edge.registration", "dapdee.device", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # the demo's table is the output
    return run_up(
        UpOptions(
            artifact=args.artifact,
            model=args.model,
            networks=nets,
            frames=args.frames,
            slowdown=args.slowdown,
            rtt_ms=args.rtt_ms,
            mode=args.mode,
            latency_budget_ms=args.latency_budget_ms,
            min_accuracy=args.min_accuracy,
            frame_rate=args.frame_rate,
            confidence_exits=args.confidence_exits,
            fp16=args.fp16,
            device_load=args.device_load,
            load_source=args.load_source or "compute",
            log=args.log,
            quiet=args.quiet,
        )
    )
