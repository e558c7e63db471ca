"""A real stack for the device runtime tests: a planner (in-process store) and an edge worker
under uvicorn on 127.0.0.1, both serving an artifact written here (a seeded untrained
width-0.25 ResNet-18, 1 channel), so the device and the edge hold the same weights and every
answer can be checked against the local model. Plus the helpers that build runtimes from parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions, partition
from dapdee.device.compute import TorchCompute
from dapdee.device.config import RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
from dapdee.device.frames import FrameFormat, random_frames
from dapdee.device.plan_source import FixedPlanSource
from dapdee.device.plans import fixed_plan
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import Frame, Plan
from dapdee.models import LoadedModel
from dapdee.netem import ShapedUplink
from dapdee.testing import ServerThread, bind_free_socket, wait_registered
from tests.conftest import SHARED_REDIS as REDIS

SPEC = "zoo:resnet18?width=0.25&in_channels=1"
K = 10.0


def write_artifact(directory: Path) -> Path:
    """weights.safetensors + manifest.json of a seeded untrained model."""
    from safetensors.torch import save_file

    from dapdee.models import MANIFEST, WEIGHTS, load_model, sha256_file

    torch.manual_seed(0)
    m = load_model(SPEC)
    save_file({k: v.contiguous() for k, v in m.module.state_dict().items()}, str(directory / WEIGHTS))
    manifest = {"model": SPEC, "name": m.name, "input_shape": list(m.input_shape)}
    manifest["weights_sha256"] = sha256_file(directory / WEIGHTS)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def edge_app(
    artifact: Path,
    planner_url: str | None,
    sock: Any,
    models: list[LoadedModel],
    settings_kw: dict[str, Any] | None = None,
    **kw: Any,
) -> Any:
    """An edge worker app serving `artifact` on `sock`; `settings_kw` override its settings,
    `kw` go to `create_app`."""
    from dapdee.edge_worker.app import create_app
    from dapdee.edge_worker.config import Settings

    port = sock.getsockname()[1]
    settings = Settings(
        models=f"@{artifact}", planner_url=planner_url, public_url=f"http://127.0.0.1:{port}", port=port,
        profile_repeats=3, profile_warmup=1, heartbeat_s=1.0, workers=1, **(settings_kw or {}),
    )  # fmt: skip
    return create_app(settings, models, **kw)


def start_edge(
    artifact: Path, planner_url: str | None, loaded: LoadedModel, settings_kw: dict[str, Any] | None = None, **kw: Any
) -> ServerThread:
    sock = bind_free_socket()
    app = edge_app(artifact, planner_url, sock, [loaded], settings_kw, **kw)
    return ServerThread(app, sock=sock, name="edge").start()


@dataclass
class Stack:
    artifact: Path
    loaded: LoadedModel  # the device's copy
    edge_loaded: LoadedModel
    graph: CostGraph  # the device profile at K
    planner: ServerThread
    edge: ServerThread

    @property
    def fmt(self) -> FrameFormat:
        return FrameFormat.of(self.loaded)

    def frames(self, n: int, seed: int) -> list[Frame]:
        return list(random_frames(self.fmt, n, seed))

    def local_class(self, x: torch.Tensor, exit_name: str) -> int:
        return int(self.loaded.run_exit(x, exit_name).argmax(dim=1)[0])

    def mid_cut(self, url: str | None, exit_name: str = "final") -> Plan:
        """A real split: the device runs about half of A(exit), one tensor crosses the cut."""
        g = self.graph
        anc = g.ancestors(g.exit(exit_name).node)
        for i in range(len(anc) // 2, len(anc)):
            part = partition(g, exit_name, anc[:i])
            if len(part.transfer) == 1 and part.transfer[0][0] != g.input.name:
                return fixed_plan(g, exit_name, part.device_nodes, url, Conditions(5.0), "test-mid-cut")
        raise AssertionError("no single-tensor cut")


def fixed_runtime(
    stack: Stack,
    plan: Plan,
    url: str | None,
    rate_mbps: float | None = None,
    config: RuntimeConfig | None = None,
    compute: Any = None,
    sensing: Sensing | None = None,
    runtime_kw: dict[str, Any] | None = None,
    trust: WorkerTrust | None = None,
    **edge_kw: Any,
) -> DeviceRuntime:
    """A runtime on a fixed plan: the user named worker `url` (trusted; with `trust`, only
    what that trusts), real torch compute at K (or `compute`), an uplink shaped at `rate_mbps`
    (None: not shaped); `runtime_kw` go to the runtime (metrics, tracing), the rest to the edge
    access."""
    config = config or RuntimeConfig()
    sensing = sensing or Sensing(prior_mbps=rate_mbps or 5.0, fixed_load=0.0)
    trust = trust or WorkerTrust(None, [url] if url else [])
    shaper = ShapedUplink(rate_mbps) if rate_mbps else None
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    edge = EdgeLink(stack.graph, trust, sensing, shaper=shaper, backoff=backoff, **edge_kw)
    return DeviceRuntime(
        stack.graph, compute or TorchCompute(stack.loaded, K), FixedPlanSource(plan), config=config,
        sensing=sensing, edge=edge, edge_url=url, slowdown=K, rate_mbps=rate_mbps, **(runtime_kw or {}),
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running(runtime: DeviceRuntime) -> AsyncIterator[DeviceRuntime]:
    """Start `runtime`; stop it and close its edge access and compute afterwards."""
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.aclose()
        if runtime.edge is not None:
            await runtime.edge.aclose()
        runtime.compute.close()


@contextlib.contextmanager
def open_stack(directory: Path, **edge_kw: Any) -> Iterator[Stack]:
    """The stack: an artifact in `directory`, the device's and the edge's copies of it (both
    fx-traced before any server thread runs modules: tracing patches nn.Module), the device
    profile at K, a planner (in-process store) and a registered edge worker."""
    from dapdee.models import load_model
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings
    from dapdee.profiler import profile_model

    artifact = write_artifact(directory)
    loaded, edge_loaded = load_model("", weights=artifact), load_model("", weights=artifact)
    graph = profile_model(loaded, "device", slowdown=K, threads=1, repeats=3, warmup=1)
    planner = ServerThread(create_app(Settings(redis_url=None)), name="planner").start()
    try:
        edge = start_edge(artifact, planner.url, edge_loaded, **edge_kw)
    except BaseException:
        planner.stop()
        raise
    try:
        wait_registered(planner.url, loaded.name, [edge.url])
        yield Stack(artifact, loaded, edge_loaded, graph, planner, edge)
    finally:
        edge.stop()
        planner.stop()


class ForwardingProxy:
    """An ASGI app forwarding every request to `target` (one keep-alive client, made on the
    server's loop). Subclasses delay a request by overriding `before_forward` and change what
    comes back by overriding `answer`."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._client: httpx.AsyncClient | None = None

    async def before_forward(self, scope: dict[str, Any]) -> None:
        """Called once a request's body has arrived, before it is forwarded; default: nothing."""

    async def answer(
        self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: httpx.Response
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) to send back; default: the target's answer unchanged."""
        kept = {k.lower(): v for k, v in response.headers.items() if k.lower() != "content-length"}
        return response.status_code, kept, response.content

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        if self._client is not None:
            await self._client.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        self._client = self._client or httpx.AsyncClient(timeout=60)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        await self.before_forward(scope)
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.lower() != b"host"}
        r = await self._client.request(scope["method"], self.target + scope["path"], content=body, headers=headers)
        status, out_headers, out = await self.answer(scope, headers, body, r)
        raw = [(k.encode(), v.encode()) for k, v in out_headers.items()] + [(b"content-length", str(len(out)).encode())]
        with contextlib.suppress(Exception):  # the client may have gone meanwhile
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": out})


class HangingProxy(ForwardingProxy):
    """A ForwardingProxy that, while `hanging` is set, accepts each request and answers nothing
    (a planner stuck behind a load balancer) until `hanging` is cleared; `held` counts the
    requests it held. Polled, so any thread may set it."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.hanging = False
        self.held = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan" and self.hanging:
            self.held += 1
            while self.hanging:
                await asyncio.sleep(0.01)
        return await super().__call__(scope, receive, send)


@contextlib.contextmanager
def hanging_leases(
    stack: Stack, name: str, lease_ttl_s: float, proxy_type: type[HangingProxy] = HangingProxy
) -> Iterator[tuple[ServerThread, HangingProxy, str]]:
    """A planner holding leases in Redis (`lease_ttl_s`, renewed every 0.3 s; no fleet
    rebalancing), an edge worker registered with it, and a `proxy_type` in front of the
    planner: yields (the edge server, the proxy, the proxy's URL). All stopped, and the
    leases removed, afterwards."""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings
    from dapdee.testing import clear_prefix, unique_prefix

    prefix = unique_prefix(name)
    settings = Settings(redis_url=REDIS, key_prefix=prefix, lease_ttl_s=lease_ttl_s, replan_after_s=0.3, rebalance_s=0)
    planner = ServerThread(create_app(settings)).start()
    edge = start_edge(stack.artifact, planner.url, stack.edge_loaded)
    proxy = proxy_type(planner.url)
    front = ServerThread(proxy, name="hanging-proxy").start()
    try:
        wait_registered(planner.url, stack.loaded.name, [edge.url])
        yield edge, proxy, front.url
    finally:
        proxy.hanging = False
        front.stop()
        edge.stop()
        planner.stop()
        clear_prefix(REDIS, prefix)


class MovingPlans:
    """A plan source that starts on `first` and answers every re-plan with `then` (what a
    planner does when a worker dies and another serves the model)."""

    replans = True

    def __init__(self, first: Plan, then: Plan) -> None:
        self.first_plan, self.then = first, then

    async def first(self, cond: Conditions) -> Plan:
        return self.first_plan

    async def plan(self, cond: Conditions) -> Plan:
        return self.then

    def meanwhile(self, current: Plan, cond: Conditions, now: float) -> Plan:
        return current

    async def aclose(self) -> None:
        return None
