"""`dapdee up`: planner + edge worker + device client in one process on 127.0.0.1.

No Docker, no Redis: the planner runs with its in-process store, the edge worker serves the
shipped Fashion-MNIST artifact (or an untrained width-0.25 ResNet-18, with a warning), both
under uvicorn in threads on free ports. The device client (K x slower than this machine)
streams real Fashion-MNIST test images over emulated uplinks and a table compares, per
network, the planner's choice (exit, cut, bytes) and its predicted latency with the measured
one, and the same for Device-Only.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ARTIFACT = "artifacts/fmnist-resnet18"
FALLBACK_SPEC = "zoo:resnet18?width=0.25&in_channels=1"


@dataclass
class UpOptions:
    artifact: str | None = None
    networks: tuple[str, ...] = ("CAT1", "3G", "4G")
    frames: int = 30
    slowdown: float = 10.0
    rtt_ms: float = 10.0
    mode: str = "auto"
    latency_budget_ms: float | None = None
    min_accuracy: float | None = None
    frame_rate: float | None = None
    fp16: bool = False
    device_load: float | None = None
    load_source: str = "compute"
    log: str | None = None
    quiet: bool = False


def find_artifact(given: str | None) -> str | None:
    """The artifact to serve: `given`, else artifacts/fmnist-resnet18 (cwd, then the repo)."""
    if given:
        return given
    for base in (Path.cwd(), REPO):
        p = base / DEFAULT_ARTIFACT
        if (p / "manifest.json").is_file() and (p / "weights.safetensors").is_file():
            return str(p)
    return None


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's comparison table (one row per network condition + Device-Only)."""
    cols = [
        ("network", "network"),
        ("uplink", "Mbit/s"),
        ("est", "est Mbit/s"),
        ("load", "dev load"),
        ("exit", "exit"),
        ("cut", "cut dev/all"),
        ("bytes", "bytes/frame"),
        ("pred", "pred ms"),
        ("meas", "meas ms"),
        ("where", "edge/local/fb"),
        ("fps", "frames/s"),
        ("acc_exit", "exit acc"),
        ("acc", "acc frames"),
    ]
    body = [[str(r.get(k, "")) for k, _ in cols] for r in rows]
    head = [h for _, h in cols]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [_row(head, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(b, widths) for b in body]
    return "\n".join(lines)


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def row_of(name: str, rate: float | None, client: Any, records: list[Any]) -> dict[str, Any]:
    from collections import Counter

    from dapdee.device.client import summarize

    s = summarize(records)
    g = client.device_graph
    exits = Counter(r.exit for r in records).most_common()
    main_exit = exits[0][0] if exits else "-"
    anc = len(g.ancestors(g.exit(main_exit).node)) if exits else 0
    where = s.get("where", {})
    acc_exit = g.exit(main_exit).accuracy if exits else None
    return {
        "network": name,
        "uplink": "-" if rate is None else f"{rate:g}",
        "est": "-" if rate is None else f"{client.bandwidth.estimate_mbps:.3g}",
        "load": f"{statistics.fmean(r.device_load or 0.0 for r in records):.2f}" if records else "-",
        "exit": main_exit + ("" if len(exits) <= 1 else f" (+{len(exits) - 1})"),
        "cut": f"{statistics.median(r.device_nodes for r in records if r.exit == main_exit):.0f}/{anc}"
        if exits
        else "-",
        "bytes": f"{s['bytes_sent_mean']:.0f}",
        "pred": _fmt(s["predicted_ms_mean"]),
        "meas": _fmt(s["measured_ms_mean"]),
        "where": f"{where.get('edge', 0)}/{where.get('local', 0)}/{where.get('fallback', 0)}",
        "acc_exit": _fmt(acc_exit, ".3f"),
        "acc": _fmt(s["accuracy"], ".3f"),
    }


async def _stream(client: Any, frames: list[Any], desc: str, quiet: bool) -> list[Any]:
    from tqdm import tqdm

    with tqdm(total=len(frames), desc=desc, file=sys.stderr, disable=quiet, leave=False) as bar:
        return await client.run(frames, progress=lambda rec: bar.update(1))


def run_up(opts: UpOptions) -> int:
    """Start everything, stream the frames per network, print the table, stop everything."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("dapdee.edge", "dapdee.edge.registration", "dapdee.device", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    t_start = time.monotonic()
    import torch

    from dapdee.device.client import (
        ClientConfig,
        DeviceClient,
        dataset_frames,
        measure_device_profile,
        random_frames,
        write_jsonl,
    )
    from dapdee.device.servers import ServerThread, bind_free_socket
    from dapdee.edge_worker.app import create_app as create_edge
    from dapdee.edge_worker.app import load_models
    from dapdee.edge_worker.config import Settings as EdgeSettings
    from dapdee.models import load_model
    from dapdee.netem import parse_network
    from dapdee.planner.app import create_app as create_planner
    from dapdee.planner.config import Settings as PlannerSettings

    torch.set_num_threads(1)
    nets = [parse_network(n) for n in opts.networks]
    artifact = find_artifact(opts.artifact)
    if artifact is None:
        print(
            f"warning: {DEFAULT_ARTIFACT} not found; serving an UNTRAINED {FALLBACK_SPEC} "
            "(accuracies are chance level; train one with `dapdee train`)",
            file=sys.stderr,
        )
        models_setting = FALLBACK_SPEC
    else:
        models_setting = f"@{artifact}"
    say = (lambda *a: None) if opts.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    planner = ServerThread(create_planner(PlannerSettings(redis_url=None, worker_ttl_s=10.0)), name="planner")
    planner.start()
    edge = None
    try:
        sock = bind_free_socket()
        edge_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        es = EdgeSettings(
            models=models_setting,
            planner_url=planner.url,
            public_url=edge_url,
            port=sock.getsockname()[1],
            profile_repeats=8,
            profile_warmup=2,
            heartbeat_s=1.0,
            workers=1,
        )
        served = load_models(es)
        # load (fx-trace) the device's copy before the edge starts running modules in its threads:
        # torch.fx tracing patches nn.Module.__call__ process-wide
        spec = "" if artifact else FALLBACK_SPEC
        loaded = load_model(spec, weights=artifact)
        if artifact is None:  # untrained: the device holds the edge's (random) weights
            loaded.module.load_state_dict(served[0].module.state_dict())
        edge = ServerThread(create_edge(es, served), sock=sock, name="edge").start()
        say(f"planner {planner.url} (in-process store, no Redis); edge {edge_url} serving {served[0].name}")
        say(f"device: profiling {loaded.name} at slowdown K={opts.slowdown:g} ...")
        device_graph = measure_device_profile(loaded, opts.slowdown, threads=1, repeats=8)
        try:
            frames = list(dataset_frames(loaded, "fashion-mnist", opts.frames))
            source = f"{len(frames)} Fashion-MNIST test images"
        except ValueError as exc:
            print(f"warning: {exc}; using random inputs", file=sys.stderr)
            frames = list(random_frames(loaded, opts.frames))
            source = f"{len(frames)} random inputs (no labels)"

        rows: list[dict[str, Any]] = []
        all_records: list[Any] = []

        async def one(name: str, rate: float | None, device_only: bool) -> None:
            cfg = ClientConfig(
                planner_url=planner.url,
                model=spec,
                weights=artifact,
                rate_mbps=rate,
                network_name=name,
                rtt_ms=opts.rtt_ms,
                slowdown=opts.slowdown,
                latency_budget_ms=opts.latency_budget_ms,
                min_accuracy=opts.min_accuracy,
                frame_rate=opts.frame_rate,
                mode=opts.mode,
                fp16=opts.fp16,
                device_load=opts.device_load,
                load_source=opts.load_source,
                device_only=device_only,
                ready_timeout_s=60.0,
            )
            client = DeviceClient(cfg, loaded=loaded, device_graph=device_graph)
            async with client:
                t0 = time.perf_counter()
                records = await _stream(client, frames, name, opts.quiet)
                wall_s = time.perf_counter() - t0
            all_records.extend(records)
            rows.append({**row_of(name, rate, client, records), "fps": f"{len(records) / wall_s:.1f}"})

        async def main() -> None:
            for net in nets:
                await one(net.name, net.rate_mbps, False)
            await one("Device-Only", None, True)

        asyncio.run(main())
        if opts.log:
            write_jsonl(all_records, opts.log)
        wall = time.monotonic() - t_start
        mode = opts.mode + (f", {opts.frame_rate:g} fps" if opts.frame_rate else "")
        print(
            f"DAPDEE all-in-one: {served[0].name} ({'artifact ' + artifact if artifact else 'untrained'}), "
            f"{source}; device K={opts.slowdown:g}x slower than this machine; "
            "uplinks shaped by token bucket, "
            f"rtt {opts.rtt_ms:g} ms; mode {mode}"
        )
        print(format_table(rows))
        print(
            "exit (+n) = the most used exit, n others too; "
            "cut = device nodes / nodes the exit needs; pred = planner's predicted latency (cost model); "
            "meas = measured here (from a frame's start to its answer); frames/s = the stream's rate; "
            "dev load = "
            + (
                f"fixed at {opts.device_load:g}; "
                if opts.device_load is not None
                else "share of CPUs used by other processes (/proc/stat); "
                if opts.load_source == "proc"
                else "share of the emulated device's time lost to other work (see ComputeLoadMonitor); "
            )
            + f"{wall:.1f} s in all"
        )
        return 0
    finally:
        if edge is not None:
            edge.stop()
        planner.stop()
