"""Abuse benchmark: the edge worker and the planner under hostile traffic, three figures, each
printed beside the limit that holds it (measured and compared in the same run).

(a) RSS growth of the edge worker (VmRSS of its `dapdee serve edge` subprocess, from
    /proc/PID/status) during a flood of hostile requests, vs a 128 MiB target.
(b) p99 latency of the health probes (planner GET /healthz, edge GET /v2/health/ready) during
    that flood, vs 50 ms.
(c) p99 latency of POST /plan on a normal model while a pathological graph (many parallel
    branches: far more cuts than any plan-map cap) is planned over and over on the same
    planner, vs 3x the idle p99 of the same request measured first.

The flood runs in its own process, for --minutes, on a bounded number of connections to each
server, every request on a fresh connection: bodies declared or streamed past the body limit,
slow uploads (a few bytes every 250 ms through raw sockets), huge row counts and a JSON body
holding a million values (edge), a graph of 100k nodes and a valid 1.9 MB graph (1,300 nodes of
up to 200 inputs, 64 exits: parsed, validated and hashed at every upload; planner), and requests
with wrong tokens. Both servers run as subprocesses on 127.0.0.1 with a random token (DAPDEE_API_TOKEN,
which grants every role); all traffic stays on 127.0.0.1.

Usage: python bench/abuse.py [--minutes 5]   (or: dapdee bench abuse --minutes 1)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import statistics
import sys
import threading
import time
from collections import Counter
from typing import Any

import httpx
from tqdm import tqdm

from dapdee.api.planner import PlanRequestBody
from dapdee.bench.load import planner_service
from dapdee.client import ApiError, PlannerClient
from dapdee.costgraph import CostGraph, Exit, InputSpec, Node
from dapdee.models import load_model
from dapdee.testing import ServiceProcess

EDGE_SPEC = "zoo:alexnet?width=0.25"
EDGE_MODEL = "alexnet"
RSS_TARGET_MIB = 128.0
HEALTH_P99_TARGET_MS = 50.0
PLAN_RATIO_TARGET = 3.0
SLOW_CONNECTIONS = 48  # per server
FAST_CONNECTIONS = 4  # per server and kind of attack
PROBE_EVERY_S = 0.02
N_BIG = 100_000  # nodes of the planner's oversized graph


# ---- the flood (its own process) -------------------------------------------------------------


async def _exchange(host: str, port: int, head: bytes, body_parts: Any, deadline: float) -> str:
    """Send `head`, then the parts `body_parts` yields (bytes, or a float: pause that long; pauses
    end at `deadline`), stopping early once the server answers; return the answer's status code
    ("reset" when the connection broke before one arrived)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError):
        return "connect-failed"
    answer = asyncio.ensure_future(reader.readline())
    try:
        try:
            writer.write(head)
            for part in body_parts:
                if answer.done():
                    break
                if isinstance(part, float):
                    if time.monotonic() > deadline:
                        break
                    await asyncio.wait({answer}, timeout=part)
                    continue
                writer.write(part)
                await writer.drain()
        except OSError:  # the server refused and closed while we were still sending
            pass
        line = await asyncio.wait_for(answer, 30)
        return line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "reset"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return "reset"
    finally:
        if not answer.done():
            answer.cancel()
        elif not answer.cancelled():
            answer.exception()  # retrieved: a reset after the answer is no news
        writer.close()


def _head(method: str, path: str, token: str, extra: str) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode()


def _attacks(target: dict[str, Any]) -> dict[str, tuple[int, Any]]:
    """Per kind of attack: (connections, a function returning (head, body parts)). O(1)."""
    token, path, method, limit = target["token"], target["path"], target["method"], target["limit"]
    chunk = b"%x\r\n%s\r\n" % (1 << 18, b" " * (1 << 18))

    def oversized_declared() -> tuple[bytes, list[Any]]:
        return _head(method, path, token, f"Content-Length: {4 * limit}\r\n"), [b"{"]

    def oversized_streamed() -> tuple[bytes, list[Any]]:
        n = (limit >> 18) + 8
        return _head(method, path, token, "Transfer-Encoding: chunked\r\n"), [chunk] * n

    def slow_upload() -> tuple[bytes, list[Any]]:
        parts: list[Any] = []
        for _ in range(400):  # 100 bytes every 250 ms: 100 s, far past any body timeout
            parts += [b" " * 100, 0.25]
        return _head(method, path, token, "Content-Length: 65536\r\n"), parts

    def wrong_token() -> tuple[bytes, list[Any]]:
        body = b'{"inputs": []}' + b" " * 60_000
        return _head(method, path, "wrong-" + token, f"Content-Length: {len(body)}\r\n"), [body]

    attacks: dict[str, tuple[int, Any]] = {
        "oversized (declared)": (FAST_CONNECTIONS, oversized_declared),
        "oversized (streamed)": (FAST_CONNECTIONS, oversized_streamed),
        "slow upload": (SLOW_CONNECTIONS, slow_upload),
        "wrong token": (FAST_CONNECTIONS, wrong_token),
    }
    for name, (h_method, h_path, body, extra, connections) in target["huge"].items():
        head = _head(h_method, h_path, token, f"Content-Length: {len(body)}\r\n{extra}")
        attacks[name] = (connections, lambda head=head, body=body: (head, [body]))
    return attacks


async def _flood_async(targets: list[dict[str, Any]], seconds: float) -> dict[str, Counter]:
    deadline = time.monotonic() + seconds
    counts: dict[str, Counter] = {}

    async def attacker(label: str, host: str, port: int, make: Any) -> None:
        while time.monotonic() < deadline:
            head, parts = make()
            status = await _exchange(host, port, head, parts, deadline)
            counts.setdefault(label, Counter())[status] += 1

    tasks = []
    for t in targets:
        for kind, (n, make) in _attacks(t).items():
            tasks += [attacker(f"{t['name']}: {kind}", "127.0.0.1", t["port"], make) for _ in range(n)]
    await asyncio.gather(*tasks)
    return counts


def _flood(targets: list[dict[str, Any]], seconds: float, out: Any) -> None:
    out.put({k: dict(v) for k, v in asyncio.run(_flood_async(targets, seconds)).items()})


# ---- measurement helpers ---------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid` in MiB (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def p99(samples_s: list[float]) -> float:
    """99th percentile in milliseconds (nearest rank)."""
    s = sorted(samples_s)
    return 1000.0 * s[min(len(s) - 1, int(0.99 * len(s)))] if s else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


class Probe(threading.Thread):
    """GETs each URL in turn every PROBE_EVERY_S until stopped; latencies per URL (a failed
    probe counts as its time to fail, at least 1 s)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.lat: dict[str, list[float]] = {u: [] for u in urls}
        self.failed: Counter = Counter()
        self.stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self.stop_event.is_set():
                for u in self.urls:
                    t0 = time.perf_counter()
                    try:
                        ok = c.get(u).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    dt = time.perf_counter() - t0
                    self.lat[u].append(dt if ok else max(dt, 1.0))
                    self.failed[u] += not ok
                self.stop_event.wait(PROBE_EVERY_S)


# ---- (a) and (b): the flood ---------------------------------------------------------------------


def flood_targets(planner: ServiceProcess, edge: ServiceProcess, token: str, edge_limit: int) -> list[dict[str, Any]]:
    """What the flood sends to each server (see `_attacks`): its port, path and body limit, and
    the server's own huge-but-small requests."""
    rows_head = json.dumps({"inputs": [{"name": "x", "shape": [10**9, 3, 32, 32], "datatype": "UINT8"}]}).encode()
    bomb = b'{"inputs":[{"name":"x","shape":[1,3,32,32],"datatype":"FP32","data":[' + b"0," * 1_000_000 + b"0]}]}"
    chain = [
        {"name": f"n{i}", "op": "relu", "inputs": [f"n{i - 1}" if i else "x"], "out_bytes": 4} for i in range(N_BIG)
    ]
    big_graph = json.dumps({"model": "huge", "input": {"name": "x", "shape": [1, 1]}, "nodes": chain}).encode()
    dense = json.dumps(dense_graph("dense"), separators=(",", ":")).encode()
    json_type = "Content-Type: application/json\r\n"
    infer = f"/v2/models/{EDGE_MODEL}/infer"
    rows_extra = f"Inference-Header-Content-Length: {len(rows_head)}\r\n"
    edge_huge = {
        "1e9 rows": ("POST", infer, rows_head, rows_extra, FAST_CONNECTIONS),
        "1M-value JSON": ("POST", infer, bomb, "", FAST_CONNECTIONS),
    }
    return [
        {"name": "edge", "token": token, "port": edge.port, "method": "POST", "path": infer, "limit": edge_limit,
         "huge": edge_huge},
        {"name": "planner", "token": token, "port": planner.port, "method": "POST", "path": "/plan",
         "limit": 16 << 20, "huge": {"100k-node graph": ("PUT", "/models/huge", big_graph, "", FAST_CONNECTIONS),
                                     "1.9 MB graph": ("PUT", "/models/dense", dense, json_type, 1)}},
    ]  # fmt: skip


def dense_graph(name: str, nodes: int = 1300, fan_in: int = 200, exits: int = 64) -> dict[str, Any]:
    """A valid cost graph just under the planner's 2 MiB body limit: `nodes` nodes each reading
    up to `fan_in` of those before it, `exits` exits spread over them. What a large upload costs
    the planner (parse, validation, hashing) is what it must do off its event loop. O(nodes ·
    fan_in)."""
    body = [
        {"name": f"n{i}", "op": "conv", "inputs": [f"n{j}" for j in range(max(0, i - fan_in), i)] or ["x"],
         "out_bytes": 1000 + i, "device_ms": 1.0 + i % 7, "edge_ms": 0.1 + i % 5}
        for i in range(nodes)
    ]  # fmt: skip
    step = nodes // exits
    heads = [{"name": f"e{k}", "node": f"n{(k + 1) * step - 1}", "accuracy": 0.5 + k / 200} for k in range(exits)]
    graph = {"model": name, "input": {"name": "x", "shape": [1, 4], "bytes": 16}, "nodes": body, "exits": heads}
    assert len(json.dumps(graph, separators=(",", ":"))) < 2 << 20, "over the planner's default body limit"
    return graph


def run_flood(edge: ServiceProcess, targets: list[dict[str, Any]], seconds: float) -> tuple[dict[str, Any], float]:
    """The flood in its own process for `seconds`, with a progress bar; (counts by attack and
    status, peak RSS of the edge worker in MiB, sampled every 0.5 s)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    flood = ctx.Process(target=_flood, args=(targets, seconds, out), daemon=True)
    flood.start()
    peak = rss_mib(edge.proc.pid)
    t_end = time.monotonic() + seconds
    done = 0
    with tqdm(total=int(seconds), desc="flood", unit="s", mininterval=5.0) as bar:
        while time.monotonic() < t_end:
            time.sleep(0.5)
            peak = max(peak, rss_mib(edge.proc.pid))
            now = min(int(seconds), int(seconds - (t_end - time.monotonic())))
            bar.update(now - done)
            done = now
    counts = out.get(timeout=120)
    flood.join(60)
    return counts, peak


def flood_phase(planner: ServiceProcess, edge: ServiceProcess, token: str, seconds: float) -> bool:
    """Run the flood for `seconds` while probing health and sampling the edge's RSS; print (a)
    and (b). True when both hold."""
    auth = {"Authorization": f"Bearer {token}"}
    infer = f"{edge.url}/v2/models/{EDGE_MODEL}/infer"
    meta = httpx.get(f"{edge.url}/v2/models/{EDGE_MODEL}", headers=auth, timeout=30).json()
    targets = flood_targets(planner, edge, token, int(meta["parameters"]["max_body_bytes"]))
    for _ in range(5):  # warm the worker's allocator with real work before the baseline
        httpx.post(infer, headers=auth, json=_infer_json(), timeout=30)
    base = rss_mib(edge.proc.pid)
    urls = [f"{planner.url}/healthz", f"{edge.url}/v2/health/ready"]
    idle = Probe(urls)  # the same probes without the flood: what this machine gives anyway
    idle.start()
    time.sleep(min(10.0, seconds / 6))
    idle.stop_event.set()
    idle.join(10)
    probe = Probe(urls)
    probe.start()
    counts, peak = run_flood(edge, targets, seconds)
    probe.stop_event.set()
    probe.join(10)
    after = rss_mib(edge.proc.pid)
    legit = httpx.post(infer, headers=auth, json=_infer_json(), timeout=30).status_code
    print(f"flood: {seconds:.0f} s; per server {SLOW_CONNECTIONS} slow uploads, {FAST_CONNECTIONS} per other attack")
    for label, by_status in sorted(counts.items()):
        print(f"  {label:34s} " + ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())))
    growth = peak - base
    print(
        f"(a) edge worker RSS: {base:.1f} MiB before, peak {peak:.1f} MiB, {after:.1f} MiB after: growth "
        f"{growth:.1f} MiB vs target {RSS_TARGET_MIB:.0f} MiB = {growth / RSS_TARGET_MIB:.2f}x: "
        f"{verdict(growth <= RSS_TARGET_MIB)} (a valid infer after the flood: HTTP {legit})"
    )
    ok = growth <= RSS_TARGET_MIB and legit == 200
    for url, lat in probe.lat.items():
        q = p99(lat)
        print(
            f"(b) p99 of GET {url.split('/', 3)[3]:18s} during the flood: {q:7.1f} ms vs {HEALTH_P99_TARGET_MS:.0f} ms "
            f"= {q / HEALTH_P99_TARGET_MS:.2f}x over {len(lat)} probes ({probe.failed[url]} failed, "
            f"median {1000 * statistics.median(lat):.1f} ms): {verdict(q <= HEALTH_P99_TARGET_MS)}; "
            f"without the flood p99 {p99(idle.lat[url]):.1f} ms"
        )
        ok &= q <= HEALTH_P99_TARGET_MS and probe.failed[url] == 0
    return ok


def _infer_json() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.25] * 3072}]}


# ---- (c): planning a pathological graph beside a normal one --------------------------------------


def pathological_graph(name: str, width: int = 16, depth: int = 3, salt: int = 0) -> dict[str, Any]:
    """`width` parallel chains of `depth` layers from the input into one merge node: (depth+1)^width
    cuts (4^16 ~ 4e9), far past any enumeration cap. `salt` changes the timings (a new build)."""
    nodes = []
    for b in range(width):
        for j in range(depth):
            prev = "x" if j == 0 else f"b{b}_{j - 1}"
            ms = 0.1 + 0.01 * ((b * depth + j + salt) % 7)
            nodes.append(Node(f"b{b}_{j}", "conv", (prev,), 4096 * (j + 1), 1000, 10 * ms, ms, (1, 16, 8, 8)))
    merge = Node("merge", "add", tuple(f"b{b}_{depth - 1}" for b in range(width)), 40, 100, 0.5, 0.05, (1, 10))
    spec = InputSpec("x", (1, 3, 32, 32), "float32", 12288)
    graph = CostGraph(name, spec, (*nodes, merge), (Exit("final", "merge"),))
    graph.validate()
    return graph.to_dict()


def normal_graph() -> dict[str, Any]:
    g = load_model(EDGE_SPEC).graph
    g = g.with_timings("device", {n.name: 1.0 for n in g.nodes}, None)
    g = g.with_timings("edge", {n.name: 0.1 for n in g.nodes}, None)
    return {**g.to_dict(), "model": "normal"}


def _plan_latencies(client: PlannerClient, seconds: float, count: int) -> list[float]:
    """Latencies of POST /plan on the normal model, one after another, for `seconds` or `count`
    (an answer other than a plan raises the SDK's error)."""
    lat: list[float] = []
    t_end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < t_end and len(lat) < count:
        i += 1
        t0 = time.perf_counter()
        client.plan(PlanRequestBody(model="normal", bandwidth_mbps=1.0 + (i % 50)))
        lat.append(time.perf_counter() - t0)
    return lat


def _pathological_round(client: PlannerClient, name: str, salt: int) -> str:
    """PUT a pathological graph and plan on it; what happened, e.g. "PUT 201, plan 200"."""
    try:
        put = "PUT 201" if client.put_graph(pathological_graph(name, salt=salt)).created else "PUT 200"
    except ApiError as exc:
        put = f"PUT {exc.status}"
    try:
        client.plan(PlanRequestBody(model=name, bandwidth_mbps=5.0))
        return f"{put}, plan 200"
    except ApiError as exc:
        return f"{put}, plan {exc.status}"


def plan_phase(planner: ServiceProcess, token: str, seconds: float) -> bool:
    """Print (c); True when it holds."""
    with PlannerClient(planner.url, token, timeout=60) as c:
        c.put_graph(normal_graph())
        _plan_latencies(c, 10, 20)  # builds and caches the normal model's plan map
        idle = _plan_latencies(c, seconds / 2, 400)
        stop = threading.Event()
        patho: Counter = Counter()

        def plan_pathological() -> None:
            with PlannerClient(planner.url, token, timeout=120) as pc:
                salt = 0
                while not stop.is_set():
                    salt += 1
                    patho[_pathological_round(pc, f"patho{salt % 4}", salt)] += 1

        worker = threading.Thread(target=plan_pathological, daemon=True)
        worker.start()
        time.sleep(1.0)  # let the first pathological build start
        busy = _plan_latencies(c, seconds, 100_000)
        stop.set()
        worker.join(180)
    q_idle, q_busy = p99(idle), p99(busy)
    limit = PLAN_RATIO_TARGET * q_idle
    print(f"pathological planning: {sum(patho.values())} rounds of PUT + POST /plan ({dict(patho)})")
    print(
        f"(c) p99 of POST /plan (normal model): idle {q_idle:.1f} ms ({len(idle)} requests), during "
        f"pathological planning {q_busy:.1f} ms ({len(busy)} requests) = {q_busy / q_idle:.2f}x idle vs target "
        f"<= {PLAN_RATIO_TARGET:.0f}x ({limit:.1f} ms): {verdict(q_busy <= limit)}"
    )
    return q_busy <= limit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="flood length (phase (c) runs half as long)")
    args = ap.parse_args()
    if not 0 < args.minutes <= 60:
        ap.error("--minutes: expected a number in (0, 60]")
    seconds = 60.0 * args.minutes
    token = secrets.token_urlsafe(24)
    env = {"DAPDEE_API_TOKEN": token}
    planner = planner_service(env=env)
    edge = ServiceProcess("edge", ["--models", EDGE_SPEC, "--threads", "1"], "/v2/health/ready", env)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine); servers on 127.0.0.1")
    try:
        planner.start()
        edge.start()
        ok = flood_phase(planner, edge, token, seconds)
        ok &= plan_phase(planner, token, seconds / 2)
    finally:
        edge.stop()
        planner.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
