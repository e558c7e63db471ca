"""`dapdee device run` (the device runtime against a planner + edge worker) and `dapdee up`
(planner + edge worker + device in one process, the README's `make demo`)."""

from __future__ import annotations

import argparse
import sys

from dapdee.cli import positive_float, positive_int


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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slowdown", type=float, default=10.0, help="K: the device is K x slower than this machine")
    p.add_argument("--rtt-ms", type=float, default=10.0, help="added round trip of the emulated network")
    p.add_argument("--frame-rate", type=positive_float, help="frames per second to sustain (heavy load: pipelined)")
    p.add_argument("--latency-budget-ms", type=positive_float)
    p.add_argument("--min-accuracy", type=_accuracy)
    p.add_argument("--mode", choices=("auto", "latency", "throughput"), default="auto")
    p.add_argument("--fp16", action="store_true", help="send boundary tensors as FP16")
    p.add_argument("--device-load", type=_load_arg, help="fixed device load (default: measured from /proc/stat)")
    p.add_argument(
        "--load-source",
        choices=("proc", "compute"),
        help="how to measure device load: proc = other processes' CPU share (/proc/stat; device run's "
        "default), compute = share of the device thread's wall time lost to other work (up's default)",
    )
    p.add_argument("--log", metavar="FILE", help="write one JSON line per frame")


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("device", help="the device runtime")
    dsub = d.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    r = dsub.add_parser(
        "run",
        help="stream frames: plan, run the device part, ship tensors to the edge, fall back locally",
        description="Each record states the shaped uplink rate and the device slowdown K.",
    )
    r.add_argument("--planner", required=True, metavar="URL", help="planner base URL, e.g. http://127.0.0.1:8100")
    r.add_argument(
        "--model",
        default="",
        metavar="SPEC_OR_NAME",
        help="zoo:NAME?opt=v, package.module:factory, or a model name the planner knows",
    )
    r.add_argument("--weights", metavar="ARTIFACT", help="artifact directory (the one the edge serves)")
    r.add_argument(
        "--network", default=None, help="shape the uplink: CAT1, 3G, 4G, WiFi or Mbit/s (default: no shaping)"
    )
    r.add_argument("--frames", type=positive_int, help="number of frames (random inputs, or the first N of --source)")
    r.add_argument("--source", help="dataset of test images, e.g. fashion-mnist (labels give accuracy)")
    r.add_argument("--edge", metavar="URL", help="edge worker URL (default: the one the plan names)")
    r.add_argument("--device-tier", help="name of this device's profile at the planner (default device-kK)")
    r.add_argument("--profile", metavar="JSON", help="device profile file: loaded if present, else measured into it")
    r.add_argument("--token", help="bearer token for planner / edge (default: $DAPDEE_API_TOKEN)")
    r.add_argument("--plan-max-age-s", type=positive_float, default=10.0)
    r.add_argument("--max-inflight", type=positive_int, default=3, help="frames in flight when pipelining")
    r.add_argument(
        "--ready-timeout-s",
        type=positive_float,
        default=30.0,
        help="how long to wait for the edge to register its profile",
    )
    r.add_argument("--device-only", action="store_true", help="baseline: no planner or edge")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(r)
    r.set_defaults(func=cmd_run)

    u = sub.add_parser(
        "up",
        help="all in one: planner + edge worker + device on 127.0.0.1 (no Docker, no Redis), emulated networks",
    )
    u.add_argument("--artifact", help="artifact to serve (default artifacts/fmnist-resnet18)")
    u.add_argument("--networks", default="CAT1,3G,4G", help="comma-separated CAT1,3G,4G,WiFi or Mbit/s")
    u.add_argument("--frames", type=positive_int, default=30, help="Fashion-MNIST test images per network")
    u.add_argument("--quiet", action="store_true")
    _common(u)
    u.set_defaults(func=cmd_up)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import time

    from dapdee.device.client import (
        ClientConfig,
        DeviceClient,
        dataset_frames,
        format_records_table,
        random_frames,
        summarize,
        write_jsonl,
    )
    from dapdee.netem import parse_network

    if args.slowdown < 1:
        raise ValueError(f"--slowdown: must be >= 1, got {args.slowdown:g}")
    net = parse_network(args.network) if args.network else None
    if not args.model and not args.weights:
        raise ValueError("give --model SPEC_OR_NAME or --weights ARTIFACT")
    cfg = ClientConfig(
        planner_url=args.planner,
        model=args.model,
        weights=args.weights,
        rate_mbps=net.rate_mbps if net else None,
        network_name=net.name if net else None,
        rtt_ms=args.rtt_ms if net else 0.0,
        slowdown=args.slowdown,
        latency_budget_ms=args.latency_budget_ms,
        min_accuracy=args.min_accuracy,
        frame_rate=args.frame_rate,
        mode=args.mode,
        fp16=args.fp16,
        edge_url=args.edge,
        device_tier=args.device_tier,
        device_load=args.device_load,
        load_source=args.load_source or "proc",
        profile_path=args.profile,
        token=args.token or os.environ.get("DAPDEE_API_TOKEN") or None,
        plan_max_age_s=args.plan_max_age_s,
        max_inflight=args.max_inflight,
        ready_timeout_s=args.ready_timeout_s,
        device_only=args.device_only,
    )

    async def main() -> tuple[DeviceClient, list, float]:
        from tqdm import tqdm

        client = DeviceClient(cfg)
        async with client:
            assert client.loaded is not None
            if args.source:
                frames = list(dataset_frames(client.loaded, args.source, args.frames))
            else:
                frames = list(random_frames(client.loaded, args.frames or 20))
            t0 = time.monotonic()
            with tqdm(total=len(frames), desc="frames", file=sys.stderr, disable=args.quiet, leave=False) as bar:
                records = await client.run(frames, progress=lambda rec: bar.update(1))
            return client, records, time.monotonic() - t0

    client, records, wall = asyncio.run(main())
    s = summarize(records, wall)
    link = f"uplink {net} shaped, rtt +{args.rtt_ms:g} ms" if net else "uplink not shaped"
    print(f"model {client.model_name}; device K={args.slowdown:g}x slower than this machine; {link}; mode {args.mode}")
    print(format_records_table(records, limit=20))
    acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
    print(
        f"frames {s['frames']}  where {s['where']}  exits {s['exits']}  "
        f"pred {s['predicted_ms_mean'] or 0:.1f} ms  meas {s['measured_ms_mean']:.1f} ms "
        f"(p50 {s['measured_ms_p50']:.1f}, p95 {s['measured_ms_p95']:.1f})  "
        f"{s['throughput_fps']:.1f} fps  accuracy {acc}  "
        f"bandwidth est {client.bandwidth.estimate_mbps:.3g} Mbit/s  plans {len(client.plans)}"
    )
    for e in client.events[-10:]:
        print(f"  {e}")
    if args.log:
        write_jsonl(records, args.log)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from dapdee.device.up import UpOptions, run_up

    if args.slowdown < 1:
        raise ValueError(f"--slowdown: must be >= 1, got {args.slowdown:g}")
    nets = tuple(n.strip() for n in args.networks.split(",") if n.strip())
    if not nets:
        raise ValueError("--networks: give at least one network")
    return run_up(
        UpOptions(
            artifact=args.artifact,
            networks=nets,
            frames=args.frames,
            slowdown=args.slowdown,
            rtt_ms=args.rtt_ms,
            mode=args.mode,
            latency_budget_ms=args.latency_budget_ms,
            min_accuracy=args.min_accuracy,
            frame_rate=args.frame_rate,
            fp16=args.fp16,
            device_load=args.device_load,
            load_source=args.load_source or "compute",
            log=args.log,
            quiet=args.quiet,
        )
    )
