"""Security hardening (issue 10), against real uvicorn servers on 127.0.0.1: bearer-token auth
on every mutating planner endpoint and on infer (401 without, 403 wrong), constant-time token
comparison, body size limits, model names validated, no unsafe deserialisation anywhere in
the source tree, CORS off by default. See docs/THREAT_MODEL.md."""

from __future__ import annotations

import ast
import inspect
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import torch

from dapdee import wire
from tests.conftest import serve_app_in_thread

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-for-tests"
EDGE_SPEC = "zoo:alexnet?width=0.25"
MODEL = "alexnet"


def _graph_json() -> dict[str, Any]:
    from dapdee.models import load_model

    g = load_model(EDGE_SPEC).graph
    g = g.with_timings("device", {n.name: 1.0 for n in g.nodes}, None)
    g = g.with_timings("edge", {n.name: 0.1 for n in g.nodes}, None)
    return g.to_dict()


@pytest.fixture(scope="module")
def graph_json() -> dict[str, Any]:
    return _graph_json()


@pytest.fixture(scope="module")
def planner(graph_json: dict[str, Any]) -> Iterator[httpx.Client]:
    """A planner with DAPDEE_API_TOKEN set (in-process store) and a small body limit."""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    app = create_app(Settings(redis_url=None, api_token=TOKEN, max_body_bytes=256 * 1024))
    with serve_app_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.put(f"/models/{MODEL}", json=graph_json, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        yield c


@pytest.fixture(scope="module")
def edge() -> Iterator[httpx.Client]:
    """An edge worker with an API token."""
    from dapdee.edge_worker.app import create_app
    from dapdee.edge_worker.config import Settings
    from dapdee.models import load_model

    settings = Settings(models=EDGE_SPEC, api_token=TOKEN, max_body_bytes=1 << 20)
    with serve_app_in_thread(create_app(settings, [load_model(EDGE_SPEC)])) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            yield c


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


# ---- auth --------------------------------------------------------------------------------


def _mutations(graph_json: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Every mutating planner endpoint with a body it would accept."""
    timings = {n["name"]: 1.0 for n in graph_json["nodes"]}
    other = {**graph_json, "model": "other"}
    return [
        ("PUT", "/models/other", other),
        ("PUT", "/models/other/profiles/dev1", {"kind": "device", "timings_ms": timings}),
        ("DELETE", "/models/other/profiles/dev1", None),
        ("DELETE", "/models/other", None),
        (
            "POST",
            "/workers/heartbeat",
            {"url": "http://127.0.0.1:9", "models": [MODEL], "tier": "edge", "load": 0.1},
        ),
    ]


def test_planner_mutations_need_the_token(planner: httpx.Client, graph_json: dict[str, Any]) -> None:
    """401 (with WWW-Authenticate) without a token or with another scheme, 403 with a wrong
    one (also a prefix / an extension of the right one), 2xx with the right one; nothing is
    changed by a refused request."""

    def snapshot() -> Any:
        return planner.get("/models").json(), [w["url"] for w in planner.get("/workers").json()["workers"]]

    for method, path, body in _mutations(graph_json):
        before = snapshot()
        for headers, want in (
            ({}, 401),
            ({"Authorization": "Basic " + TOKEN}, 401),
            ({"Authorization": "Bearer"}, 401),
            (_auth("wrong"), 403),
            (_auth(TOKEN[:-1]), 403),
            (_auth(TOKEN + "x"), 403),
            (_auth(TOKEN.upper()), 403),
        ):
            r = planner.request(method, path, json=body, headers=headers)
            assert r.status_code == want, (method, path, headers, r.status_code, r.text)
            if want == 401:
                assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
        assert snapshot() == before, f"a refused {method} {path} changed the planner's state"
        r = planner.request(method, path, json=body, headers=_auth(TOKEN))
        assert r.status_code == 200, (method, path, r.text)
    assert planner.get("/workers").json()["workers"], "the authorised heartbeat registered"


def test_planner_reads_and_plans_stay_open(planner: httpx.Client) -> None:
    """Reads and POST /plan (which changes nothing) need no token."""
    for path in (
        "/healthz",
        "/readyz",
        "/models",
        f"/models/{MODEL}",
        f"/models/{MODEL}/profiles",
        "/metrics",
    ):
        assert planner.get(path).status_code == 200, path
    r = planner.post("/plan", json={"model": MODEL, "bandwidth_mbps": 5.0})
    assert r.status_code == 200, r.text


def test_edge_infer_needs_the_token(edge: httpx.Client) -> None:
    body, headers = wire.encode_request({"x": torch.randn(1, 3, 32, 32)}, parameters={"exit": "final"})
    path = f"/v2/models/{MODEL}/infer"
    for extra, want in (
        ({}, 401),
        ({"Authorization": "Basic " + TOKEN}, 401),
        (_auth("wrong"), 403),
        (_auth(TOKEN[:-1]), 403),
        (_auth(TOKEN + "x"), 403),
    ):
        r = edge.post(path, content=body, headers={**headers, **extra})
        assert r.status_code == want, (extra, r.text)
        assert "error" in r.json()
    r = edge.post(path, content=body, headers={**headers, **_auth(TOKEN)})
    assert r.status_code == 200, r.text
    # health and metadata stay open (load balancers and stock v2 clients probe them)
    assert edge.get("/v2/health/ready").status_code == 200
    assert edge.get(f"/v2/models/{MODEL}").status_code == 200


def test_token_comparison_is_constant_time() -> None:
    """Both services compare tokens with hmac.compare_digest, never with == / !=."""
    from dapdee.edge_worker import deps as edge_deps
    from dapdee.planner import deps as planner_deps

    for fn in (planner_deps.require_token, edge_deps.check_token):
        src = inspect.getsource(fn)
        assert "hmac.compare_digest(" in src, fn.__qualname__
        tree = ast.parse(src.lstrip() if not src.startswith(" ") else "if 1:\n" + src)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq)) for o in node.ops):
                text = ast.unparse(node)
                assert "token" not in text and "given" not in text, (fn.__qualname__, text)


# ---- body size limits --------------------------------------------------------------------


def _raw(url: str, data: bytes) -> bytes:
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
    return out


def test_planner_body_limit(planner: httpx.Client) -> None:
    """Declared too big: 413 before the body is read; chunked and growing past it: 413."""
    url = str(planner.base_url)
    for path in ("/plan", f"/models/{MODEL}", "/workers/heartbeat"):
        method = "PUT" if path.startswith("/models") else "POST"
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {10 << 20}\r\n\r\n"
        ).encode()
        assert _raw(url, head + b"{").startswith(b"HTTP/1.1 413"), path
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        assert _raw(url, head + chunk * 6).startswith(b"HTTP/1.1 413"), path
    assert planner.get("/healthz").status_code == 200


def test_edge_body_limit(edge: httpx.Client) -> None:
    url = str(edge.base_url)
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {10 << 20}\r\n\r\n"
    ).encode()
    assert _raw(url, head + b"{").startswith(b"HTTP/1.1 413")


# ---- model names -------------------------------------------------------------------------

BAD_NAMES = ["..", "../etc", "a/b", "a\\b", ".hidden", "-x", "x" * 65, "a b", "a\x00b", "é", "a:b", "a*"]


def test_model_names_are_validated(planner: httpx.Client, graph_json: dict[str, Any]) -> None:
    """Names that could become paths or key patterns are refused (4xx, never 5xx) and never stored."""
    from dapdee.models import ModelError, check_model_name

    for name in BAD_NAMES:
        with pytest.raises(ModelError):
            check_model_name(name)
        quoted = quote(name, safe="")
        body = {**graph_json, "model": name}
        r = planner.put(f"/models/{quoted}", json=body, headers=_auth(TOKEN))
        assert 400 <= r.status_code < 500, (name, quoted, r.status_code, r.text)
        r = planner.put(
            f"/models/{MODEL}/profiles/{quoted}",
            json={"kind": "device", "timings_ms": {}},
            headers=_auth(TOKEN),
        )
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        r = planner.post(
            "/workers/heartbeat",
            json={"url": "http://127.0.0.1:9", "models": [name], "tier": "edge", "load": 0.0},
            headers=_auth(TOKEN),
        )
        assert r.status_code == 422, (name, r.text)
    names = {m["model"] for m in planner.get("/models").json()["models"]}
    assert names <= {MODEL, "other"}


def test_edge_unknown_model_names_are_404(edge: httpx.Client) -> None:
    for name in ("..%2F..%2Fetc%2Fpasswd", "x" * 300, "%00", "alexnet.."):
        r = edge.get(f"/v2/models/{name}")
        assert r.status_code == 404, (name, r.text)
        assert len(r.text) < 600  # long names are shortened in the message


def test_profile_cache_paths_stay_inside_the_cache(tmp_path: Path) -> None:
    """The only place a model name meets the file system (the edge's profile cache) uses names
    that passed check_model_name, so the path never leaves the cache directory."""
    from dapdee.edge_worker.registration import profile_path
    from dapdee.models import check_model_name

    for name in ("resnet18", "vgg16.v2", "a-b_c"):
        p = profile_path(str(tmp_path), check_model_name(name), "edge").resolve()
        assert p.parent == tmp_path.resolve()


# ---- no unsafe deserialisation -----------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _unsafe_uses(path: Path) -> list[str]:
    """Calls and imports in one file that could run code from data: pickle & co., torch.load,
    eval/exec/compile, yaml.load without SafeLoader, numpy.load(allow_pickle=True)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            out.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            f = node.func
            name = ast.unparse(f)
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                out.append(f"{where} {name}(")
            elif name in ("torch.load", "torch.jit.load", "yaml.unsafe_load", "yaml.full_load"):
                out.append(f"{where} {name}(")
            elif name == "yaml.load" and not any("Safe" in ast.unparse(a) for a in node.args[1:] + node.keywords):
                out.append(f"{where} yaml.load without SafeLoader")
            elif name.endswith(("np.load", "numpy.load")) and any(
                k.arg == "allow_pickle" and ast.unparse(k.value) != "False" for k in node.keywords
            ):
                out.append(f"{where} {name}(allow_pickle=...)")
    return out


def test_no_unsafe_deserialisation_in_the_source_tree() -> None:
    files = [p for d in ("dapdee", "services", "clients") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    found = [u for p in files for u in _unsafe_uses(p)]
    assert not found, "unsafe deserialisation / dynamic code:\n" + "\n".join(found)


def test_the_scanner_catches_what_it_should(tmp_path: Path) -> None:
    bad = REPO / "tests" / "_unsafe_sample_for_scan.py"
    sample = (
        "import pickle\nimport torch, yaml\nfrom marshal import loads\nx = torch.load('f')\n"
        "y = eval('1')\nz = yaml.load(s)\nimport numpy as np\nw = np.load(p, allow_pickle=True)\n"
    )
    bad.write_text(sample)
    try:
        found = _unsafe_uses(bad)
    finally:
        bad.unlink()
    assert len(found) == 6, found


# ---- CORS --------------------------------------------------------------------------------


def test_cors_is_off_by_default(planner: httpx.Client, edge: httpx.Client) -> None:
    """No Access-Control-Allow-* header on a cross-origin request or a preflight, so a browser
    page elsewhere cannot read answers or send credentialed mutations."""
    origin = {"Origin": "http://evil.example"}
    pre = {
        **origin,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization",
    }
    for client, path in ((planner, "/models"), (planner, "/plan"), (edge, f"/v2/models/{MODEL}")):
        for r in (client.get(path, headers=origin), client.options(path, headers=pre)):
            assert not any(h.lower().startswith("access-control-allow") for h in r.headers), (
                path,
                dict(r.headers),
            )


def test_token_protected_stack_end_to_end() -> None:
    """Planner and edge worker both with DAPDEE_API_TOKEN: the worker registers with it, a device
    client with the token streams frames through the edge; one without it is refused (401)."""
    import asyncio

    from dapdee.bench.load import edge_service, planner_service, wait_registered
    from dapdee.device.client import ClientConfig, DeviceClient, PlannerError, random_frames
    from dapdee.models import load_model
    from dapdee.profiler import profile_model

    loaded = load_model(EDGE_SPEC)
    dev = profile_model(loaded, "device", slowdown=100.0, threads=1, repeats=2, warmup=1)
    # 10x pessimistic device timings: the plan uses the edge whatever the first uplink estimate
    dev = dev.with_timings("device", {n.name: n.device_ms * 10 for n in dev.nodes}, None)
    planner = planner_service(env={"DAPDEE_API_TOKEN": TOKEN})
    planner.start()
    edge = edge_service(EDGE_SPEC, planner.url)
    edge.env["DAPDEE_API_TOKEN"] = TOKEN
    edge.start()
    try:
        wait_registered(planner.url, MODEL, [edge.url])

        def client(token: str | None) -> DeviceClient:
            cfg = ClientConfig(
                planner_url=planner.url, model=EDGE_SPEC, slowdown=100.0, device_load=0.0, token=token, threads=1
            )
            return DeviceClient(cfg, loaded=loaded, device_graph=dev)

        async def go() -> list[Any]:
            with pytest.raises(PlannerError, match="401"):
                await client(None).start()
            async with client(TOKEN) as c:
                return await c.run(random_frames(loaded, 8))

        records = asyncio.run(go())
    finally:
        edge.kill()
        planner.kill()
    assert len(records) == 8 and all(r.pred_class >= 0 for r in records)
    assert any(r.where == "edge" for r in records), [r.where for r in records]
