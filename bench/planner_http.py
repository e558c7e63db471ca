"""Planner HTTP benchmark: closed-loop load on POST /plan vs GET /healthz of the same server.

Starts a planner (`dapdee serve planner`, with admin and device tokens) in a subprocess, uploads a
synthetic ResNet-like cost graph (residual blocks, so the plan map is a real DAG front) with the
admin token, then drives each endpoint (POST /plan with the device token) with
N concurrent keep-alive clients from a separate load process (asyncio, raw HTTP/1.1: a client
cheap enough not to be the bottleneck), the two endpoints alternating in `--rounds` short
windows so that a drifting host load touches both alike. Prints plans/s and p50/p99 latency
of both endpoints, their throughput ratio, and PASS/FAIL against the targets (plan ≥ 70 % of
healthz throughput, plan p99 ≤ 20 ms).

With `--lease`, the same load compares, on one planner with Redis and one live worker (kept
alive by heartbeats), POST /plan with `device_id` + `frame_rate` (a lease: one Lua reservation
that verifies the planner's view of the leases, a second round trip when that view was out of
date) against the same requests without `device_id`, at one
client and at `--clients`; target: a leased plan answers in <= 2x the time (p50) of one without.

    python bench/planner_http.py [--clients 50] [--seconds 5] [--redis-url none] [--lease]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapdee.api.planner import PlanRequestBody
from dapdee.client import PlannerClient
from dapdee.client.planner import healthz_call, plan_call
from dapdee.client.transport import Call
from dapdee.testing import ServiceProcess, clear_prefix, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.70
TARGET_P99_MS = 20.0
TARGET_LEASE_X = 2.0
LEASE_DEVICES = 256  # device ids the leased requests cycle through


def synthetic_graph(model: str = "bench_resnet", blocks: int = 8) -> dict[str, Any]:
    """A ResNet-like cost graph: stem, `blocks` residual blocks (two convs + add), an exit head
    after every second block and a final head; device ~10x slower than edge. O(blocks)."""
    nodes: list[dict[str, Any]] = []
    exits: list[dict[str, Any]] = []

    def add(name: str, inputs: list[str], out_bytes: int, dev: float) -> None:
        nodes.append(
            {
                "name": name,
                "op": "conv2d",
                "inputs": inputs,
                "out_bytes": out_bytes,
                "flops": 1000,
                "device_ms": dev,
                "edge_ms": round(dev / 10, 4),
            }
        )

    add("stem", ["x"], 65536, 1.5)
    prev = "stem"
    size = 65536
    for b in range(blocks):
        if b % 2 == 1 and size > 4096:
            size //= 2
        add(f"b{b}_c1", [prev], size, 1.0 + 0.1 * b)
        add(f"b{b}_c2", [f"b{b}_c1"], size, 1.0 + 0.1 * b)
        add(f"b{b}_add", [f"b{b}_c2", prev], size, 0.05)
        prev = f"b{b}_add"
        if b % 2 == 1 and b < blocks - 1:
            add(f"exit{b // 2 + 1}_fc", [prev], 40, 0.02)
            exits.append({"name": f"exit{b // 2 + 1}", "node": f"exit{b // 2 + 1}_fc", "accuracy": 0.8 + 0.02 * b})
    add("fc", [prev], 40, 0.02)
    exits.append({"name": "final", "node": "fc", "accuracy": 0.95})
    return {
        "model": model,
        "input": {"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32", "bytes": 12288},
        "nodes": nodes,
        "exits": exits,
    }


# ---- load process ------------------------------------------------------------------------------


async def _client(host: str, port: int, reqs: list[bytes], stop_at: float, lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            n = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    n = int(line[15:])
                    break
            if n:
                await reader.readexactly(n)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


@dataclass
class _Tally:
    """One endpoint's measured windows, summed over the rounds."""

    lat: list[float] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    elapsed: float = 0.0
    cpu_s: float = 0.0

    def summary(self) -> dict:
        self.lat.sort()
        n = len(self.lat)
        return {
            "requests": n,
            "errors": len(self.errors),
            "rps": n / self.elapsed if self.elapsed else 0.0,
            "p50_ms": 1000 * self.lat[n // 2] if n else float("nan"),
            "p99_ms": 1000 * self.lat[min(n - 1, int(n * 0.99))] if n else float("nan"),
            "cpu_us": 1e6 * self.cpu_s / n if n else float("nan"),
        }


async def _window(host: str, port: int, reqs: list[bytes], clients: int, seconds: float, tally: _Tally | None) -> None:
    """`clients` closed-loop clients for `seconds`; counted into `tally` (None: warm-up)."""
    scratch = tally if tally is not None else _Tally()
    t0 = time.perf_counter()
    stop = t0 + seconds
    await asyncio.gather(*(_client(host, port, reqs, stop, scratch.lat, scratch.errors) for _ in range(clients)))
    scratch.elapsed += time.perf_counter() - t0


async def _load(
    host: str, port: int, loads: dict[str, list[bytes]], clients: int, seconds: float, warmup: float, job: dict
) -> dict[str, dict]:
    """Each named load warmed up, then measured in `job["rounds"]` windows of seconds / rounds,
    the loads alternating (ABBA...: a drifting host touches them alike); the server's CPU time
    (process `job["pid"]`, read from /proc at each window's ends) per answered request."""
    for reqs in loads.values():
        await _window(host, port, reqs, clients, warmup, None)
    rounds = max(1, int(job.get("rounds", 1)))
    tallies = {name: _Tally() for name in loads}
    order = list(loads)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            c0 = _cpu_s(job["pid"])
            await _window(host, port, loads[name], clients, seconds / rounds, tallies[name])
            tallies[name].cpu_s += _cpu_s(job["pid"]) - c0
    return {name: t.summary() for name, t in tallies.items()}


def run_load(
    host: str, port: int, pid: int, loads: dict[str, list[bytes]], args: argparse.Namespace
) -> dict[str, dict]:
    """Closed-loop load from a separate process (this module with --load-worker): per named
    load its throughput, latency and the server's CPU per request (`_load`)."""
    job = {
        "host": host,
        "port": port,
        "pid": pid,
        "loads": {name: [r.decode("latin-1") for r in reqs] for name, reqs in loads.items()},
        "clients": args.clients,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
    }
    out = subprocess.run(
        [sys.executable, "-m", "dapdee.bench.planner_http", "--load-worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=len(loads) * (args.seconds + args.warmup) + 120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    if out.returncode != 0:
        raise SystemExit(f"load process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _load_worker() -> int:
    job = json.loads(sys.stdin.read())
    loads = {name: [r.encode("latin-1") for r in reqs] for name, reqs in job["loads"].items()}
    res = asyncio.run(_load(job["host"], job["port"], loads, job["clients"], job["seconds"], job["warmup"], job))
    print(json.dumps(res))
    return 0


# ---- server --------------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by the process and its live children (uvicorn
    workers); Linux /proc, nan elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, IndexError, ValueError):
        return float("nan")
    return total + sum(_cpu_s(int(k)) for k in kids)


def raw_request(call: Call[Any], host: str, token: str | None = None) -> bytes:
    """The HTTP/1.1 bytes of an SDK call (its path, headers and body as the SDK builds them),
    for a load generator that writes requests to a socket itself. O(body)."""
    head = f"{call.method} {call.path} HTTP/1.1\r\nHost: {host}\r\n"
    headers = dict(call.headers)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if call.content:
        headers["Content-Length"] = str(len(call.content))
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + call.content


def plan_bodies(model: str) -> list[PlanRequestBody]:
    """Six plan requests across uplinks, loads and modes (frame rate 30)."""
    return [
        PlanRequestBody(
            model=model,
            bandwidth_mbps=bw,
            rtt_ms=5.0,
            device_load=0.1 * (i % 3),
            mode=("auto", "latency", "throughput")[i % 3],
            frame_rate=30.0,
        )
        for i, bw in enumerate((0.13, 1.1, 5.85, 18.88, 50.0, 100.0))
    ]


def _prepare(base: str, host: str, admin: str, device: str) -> tuple[list[bytes], list[bytes]]:
    """Upload the synthetic graph (admin), plan once (device: builds the plan map, not
    measured); the raw /plan and /healthz requests of the load."""
    graph = synthetic_graph()
    bodies = plan_bodies(graph["model"])
    with PlannerClient(base, admin, timeout=60) as planner:
        planner.put_graph(graph)
    with PlannerClient(base, device, timeout=60) as planner:
        planner.plan(bodies[0])
    return [raw_request(plan_call(b), host, device) for b in bodies], [raw_request(healthz_call(), host)]


# ---- --lease: a leased plan vs the same plan without a device id ------------------------------------


def leased(bodies: list[PlanRequestBody], devices: int = LEASE_DEVICES) -> list[PlanRequestBody]:
    """`bodies` cycled over `devices` device ids, each with its `device_id` (they all carry a
    frame rate), so the load creates and refreshes that many leases. O(devices)."""
    return [bodies[i % len(bodies)].model_copy(update={"device_id": f"bench-dev-{i:04d}"}) for i in range(devices)]


def _heartbeats(base: str, token: str, model: str, stop: threading.Event) -> None:
    """Keep one worker live (a heartbeat every second) until `stop`; it is never contacted."""
    body = {"url": "http://127.0.0.1:9", "models": [model], "tier": "edge", "load": 0.0, "capacity_ms_per_s": 1000.0}
    with PlannerClient(base, token, timeout=5) as client:
        while not stop.is_set():
            client.heartbeat(body)
            stop.wait(1.0)


def _lease_rows(
    pid: int, host: str, port: int, plain: list[bytes], lease: list[bytes], args: argparse.Namespace
) -> list[tuple[int, dict, dict]]:
    """(clients, without device_id, with device_id) at one client and at `--clients`."""
    rows = []
    for clients in sorted({1, args.clients}):
        one = argparse.Namespace(**{**vars(args), "clients": clients})
        res = run_load(host, port, pid, {"plain": plain, "lease": lease}, one)
        rows.append((clients, res["plain"], res["lease"]))
    return rows


def lease_main(args: argparse.Namespace) -> int:
    """The --lease comparison (module docstring); exit 1 when a target fails."""
    redis_url = args.redis_url if args.redis_url not in (None, "none") else "redis://127.0.0.1:6379/0"
    prefix = unique_prefix("bench-lease")
    admin, device, worker = (secrets.token_urlsafe(24) for _ in range(3))
    env = {"DAPDEE_KEY_PREFIX": prefix, "DAPDEE_ADMIN_TOKEN": admin, "DAPDEE_DEVICE_TOKEN": device,
           "DAPDEE_WORKER_TOKEN": worker, "DAPDEE_REBALANCE_S": "0"}  # fmt: skip
    server = ServiceProcess("planner", ["--redis-url", redis_url, "--workers", str(args.workers)], "/readyz", env)
    host, stop = "127.0.0.1", threading.Event()
    try:
        server.start(60)
        assert server.proc is not None
        graph = synthetic_graph()
        beat = threading.Thread(target=_heartbeats, args=(server.url, worker, graph["model"], stop), daemon=True)
        beat.start()
        plain_reqs, _ = _prepare(server.url, host, admin, device)
        bodies = plan_bodies(graph["model"])
        with PlannerClient(server.url, device, timeout=60) as planner:
            if planner.plan(leased(bodies, 1)[0]).lease is None:
                raise SystemExit("the planner answered a plan with device_id without a lease")
        lease_reqs = [raw_request(plan_call(b), host, device) for b in leased(bodies)]
        rows = _lease_rows(server.proc.pid, host, server.port, plain_reqs, lease_reqs, args)
    finally:
        stop.set()
        server.stop()
        clear_prefix(redis_url, prefix)
    print(
        f"planner HTTP benchmark, leases: POST /plan with device_id + frame_rate ({LEASE_DEVICES} devices) vs "
        f"without device_id; Redis {redis_url}, one live worker, planner workers={args.workers}, "
        f"{args.seconds:g} s each, cpus={os.cpu_count()}"
    )
    ok = True
    for clients, plain, lease in rows:
        for name, res in (("without device_id", plain), ("with a lease", lease)):
            print(
                f"  {clients:3d} client(s) {name:17s} {res['rps']:6.0f} req/s  p50 {res['p50_ms']:6.2f} ms  "
                f"p99 {res['p99_ms']:6.2f} ms  server CPU {res['cpu_us']:5.0f} us/req ({res['errors']} errors)"
            )
        ratio = lease["p50_ms"] / plain["p50_ms"]
        passed = ratio <= TARGET_LEASE_X and lease["errors"] == 0 and plain["errors"] == 0
        ok = ok and passed
        print(
            f"  {clients} client(s): leased/plain p50 {ratio:.2f}x (p99 {lease['p99_ms'] / plain['p99_ms']:.2f}x) "
            f"(target <= {TARGET_LEASE_X:g}x, no errors): {'PASS' if passed else 'FAIL'}"
        )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per endpoint")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=6, help="measured windows per endpoint, the endpoints alternating")
    ap.add_argument(
        "--redis-url",
        default=None,
        help="planner's Redis ('none': in-process only; default: none for one worker, "
        "redis://127.0.0.1:6379/0 for several)",
    )
    ap.add_argument("--workers", type=int, default=1, help="planner worker processes")
    ap.add_argument("--lease", action="store_true", help="compare POST /plan with and without a lease (Redis)")
    ap.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load_worker:
        return _load_worker()
    if args.lease:
        return lease_main(args)

    if args.redis_url is None:
        args.redis_url = "none" if args.workers == 1 else "redis://127.0.0.1:6379/0"
    prefix = unique_prefix("bench-planner")
    admin, device = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {"DAPDEE_KEY_PREFIX": prefix, "DAPDEE_ADMIN_TOKEN": admin, "DAPDEE_DEVICE_TOKEN": device}
    server = ServiceProcess("planner", ["--redis-url", args.redis_url, "--workers", str(args.workers)], "/readyz", env)
    host = "127.0.0.1"
    try:
        server.start(60)
        assert server.proc is not None
        plan_reqs, health_reqs = _prepare(server.url, host, admin, device)
        res = run_load(host, server.port, server.proc.pid, {"healthz": health_reqs, "plan": plan_reqs}, args)
        health, plan = res["healthz"], res["plan"]
    finally:
        server.stop()
        if args.redis_url != "none":
            clear_prefix(args.redis_url, prefix)

    ratio = plan["rps"] / health["rps"] if health["rps"] else 0.0
    print(
        f"planner HTTP benchmark: {args.clients} closed-loop clients, {args.seconds:g} s per endpoint in "
        f"{args.rounds} alternating windows, "
        f"planner workers={args.workers} (uvicorn), loopback, cpus={os.cpu_count()}"
    )
    for name, res in (("GET /healthz", health), ("POST /plan", plan)):
        print(
            f"  {name:13s} {res['rps']:6.0f} req/s  p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms "
            f"server CPU {res['cpu_us']:5.0f} us/req ({res['requests']} requests, {res['errors']} errors)"
        )
    ok_ratio = ratio >= TARGET_RATIO
    ok_p99 = plan["p99_ms"] <= TARGET_P99_MS
    ok_err = plan["errors"] == 0 and health["errors"] == 0
    verdict = {True: "PASS", False: "FAIL"}
    print(f"  plan/healthz throughput ratio {ratio:.2f} (target >= {TARGET_RATIO:.2f}): {verdict[ok_ratio]}")
    print(f"  plan p99 {plan['p99_ms']:.2f} ms (target <= {TARGET_P99_MS:.0f} ms): {verdict[ok_p99]}")
    print(f"  errors: {'PASS' if ok_err else 'FAIL'}")
    return 0 if (ok_ratio and ok_p99 and ok_err) else 1


if __name__ == "__main__":
    sys.exit(main())
