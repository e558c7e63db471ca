"""Edge worker benchmark.

1. Throughput and latency of `POST /v2/models/{m}/infer` for a ResNet-18 mid-network cut with
   dynamic batching on vs off (same run, same machine): the worker runs as `dapdee serve edge`
   in a subprocess; 32 concurrent closed-loop keep-alive HTTP/1.1 connections (asyncio, request
   bytes built once, so the load generator costs little CPU) in this process.
   Target: batching >= 1.5x the requests/s of no batching.
2. Wire codec cost: encode + decode time per MB of FP32 tensor data vs the time 1 MB takes on a
   4G uplink (5.85 Mbit/s ~= 1368 ms). Target: <= 1 %.

Usage: python bench/edge_worker.py [--spec zoo:resnet18?width=0.5] [--seconds 8] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

from dapdee import wire
from dapdee.client import infer_call
from dapdee.costmodel import partition
from dapdee.models import load_model
from dapdee.testing import ServiceProcess
from dapdee.web import scrape

ROOT = Path(__file__).resolve().parent.parent
UPLINK_4G_MBPS = 5.85


def default_model() -> tuple[str, str | None]:
    """The shipped ResNet-18 artifact when present, else the width-0.5 zoo model (untrained)."""
    for d in sorted((ROOT / "artifacts").glob("*resnet18*")):
        if (d / "manifest.json").is_file():
            return "", str(d)
    return "zoo:resnet18?width=0.5", None


def edge_worker(models_arg: str, batch_max: int, wait_ms: float, threads: int) -> ServiceProcess:
    """`dapdee serve edge` for the benchmark (not started): the models, batching, 1024
    concurrent requests, `threads` torch threads."""
    args = ["--models", models_arg, "--batch-max", str(batch_max), "--batch-wait-ms", str(wait_ms)]
    args += ["--max-concurrency", "1024", "--threads", str(threads)]
    return ServiceProcess("edge", args, "/v2/health/ready")


async def _one_client(host: str, port: int, request: bytes, stop: float, lat: list[float], errors: list[int]) -> None:
    """A keep-alive HTTP/1.1 connection sending `request` back to back until `stop` (a minimal
    wrk-style load generator: the request bytes are built once, so the client costs ~nothing)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            if b" 200 " not in status:
                errors.append(1)
            lat.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def load_test(base: str, path: str, body: bytes, headers: dict[str, str], clients: int, seconds: float) -> dict:
    """Closed loop: `clients` connections each send a request, wait for the answer, repeat."""
    host, port = base.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = head.encode() + body
    lat: list[float] = []
    errors: list[int] = []
    warm = time.perf_counter() + 1.0  # warm-up second, not counted
    await asyncio.gather(*(_one_client(host, int(port), request, warm, [], errors) for _ in range(clients)))
    stop = time.perf_counter() + seconds
    t_start = time.perf_counter()
    await asyncio.gather(*(_one_client(host, int(port), request, stop, lat, errors) for _ in range(clients)))
    elapsed = time.perf_counter() - t_start
    lat.sort()
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "n": len(lat),
        "errors": len(errors),
    }


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def mean_batch(base: str, model: str) -> float:
    samples = scrape.parse(httpx.get(f"{base}/metrics", timeout=10).text)
    rows = scrape.total(samples, "dapdee_edge_batch_size_sum", model=model)
    return rows / max(scrape.total(samples, "dapdee_edge_batch_size_count", model=model), 1.0)


def codec_ms_per_mb(wire_dtype: str, binary: bool = True, repeats: int = 50) -> float:
    t = torch.randn(250_000)  # 1 MB of FP32

    def once() -> None:
        body, h = wire.encode_request({"t": t}, wire_dtype=wire_dtype, binary=binary)
        wire.decode_request(body, wire.parse_header_length(h.get(wire.HEADER_LENGTH)), 1 << 20)

    for _ in range(3):
        once()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", help="model spec (default: shipped resnet18 artifact, else zoo:resnet18?width=0.5)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--batch-max", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="worker's torch intra-op threads (both modes)")
    args = ap.parse_args()
    spec, artifact = (args.spec, None) if args.spec else default_model()
    m = load_model(spec, weights=artifact)
    models_arg = f"{spec}@{artifact}" if artifact else spec
    needed = m.graph.ancestors(m.exit_node("final"))
    part = partition(m.graph, "final", needed[: len(needed) // 2])
    x = m.example_input()
    names = [u for u, _ in part.transfer]
    with torch.inference_mode():
        out = m.executor.compute({m.input_name: x}, [n for n in names if n != m.input_name])
    sent = {n: (x if n == m.input_name else out[n]) for n in names}
    call = infer_call(m.name, sent, exit="final")
    body, headers = call.content, dict(call.headers)
    print(
        f"model {m.name} ({models_arg}), cut after {len(part.device_nodes)}/{len(needed)} nodes, "
        f"sends {', '.join(names)} = {len(body)} bytes/request; {args.clients} concurrent clients, "
        f"{args.seconds:.0f} s each (closed loop, keep-alive HTTP/1.1); worker torch threads {args.threads}; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    results = {}
    for label, bmax in (
        ("batching off", 1),
        (f"batching on (max {args.batch_max}, {args.batch_wait_ms} ms)", args.batch_max),
    ):
        with edge_worker(models_arg, bmax, args.batch_wait_ms, args.threads).start(120) as worker:
            assert worker.proc is not None
            cpu0 = proc_cpu_s(worker.proc.pid)
            r = asyncio.run(load_test(worker.url, call.path, body, headers, args.clients, args.seconds))
            r["cpu_ms"] = 1000 * (proc_cpu_s(worker.proc.pid) - cpu0) / r["n"]  # includes the warm-up second
            r["batch"] = mean_batch(worker.url, m.name)
        results[bmax] = r
        print(
            f"  {label:38s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
            f"  mean batch {r['batch']:4.1f}  worker CPU {r['cpu_ms']:.2f} ms/req"
            f"  ({r['n']} req, {r['errors']} errors)"
        )
    ratio = results[args.batch_max]["rps"] / results[1]["rps"]
    print(f"  throughput ratio on/off = {ratio:.2f}x (target >= 1.5x): {'PASS' if ratio >= 1.5 else 'FAIL'}")
    ok = codec_report()
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)")
    return 0 if ratio >= 1.5 and ok else 1


def codec_report() -> bool:
    """Print the wire codec's encode + decode time per MB against a 4G uplink's time for it;
    True when every binary dtype stays within 1 %."""
    mb_ms = 8 * 1e6 / (UPLINK_4G_MBPS * 1e6) * 1000
    print(
        f"wire codec, encode + decode per MB of FP32 tensor data vs {mb_ms:.0f} ms on a 4G uplink "
        f"({UPLINK_4G_MBPS} Mbit/s):"
    )
    ok = True
    for dt in ("FP32", "FP16", "INT8"):
        ms = codec_ms_per_mb(dt)
        pct = 100 * ms / mb_ms
        ok &= pct <= 1.0
        print(
            f"  binary {dt}: {ms:7.3f} ms/MB = {pct:.3f} % of the uplink time (target <= 1 %): "
            f"{'PASS' if pct <= 1.0 else 'FAIL'}"
        )
    js = codec_ms_per_mb("FP32", binary=False, repeats=5)
    print(f"  JSON FP32 (for reference, no target): {js:7.1f} ms/MB = {100 * js / mb_ms:.1f} %")
    return ok


if __name__ == "__main__":
    sys.exit(main())
