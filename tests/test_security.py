"""Security hardening, against real uvicorn servers on 127.0.0.1: bearer-token auth
on every mutating planner endpoint and on infer (401 without, 403 wrong), constant-time token
comparison, body size limits, model names validated, no unsafe deserialisation anywhere in
the source tree, CORS off by default. The edge worker's own checks are in
tests/test_edge_security.py. See docs/THREAT_MODEL.md."""

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

from tests.conftest import serve_app_in_thread

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-for-tests"  # the all-roles DAPDEE_API_TOKEN of the end-to-end test
ROLE_TOKENS = {"admin": "admin-s3cret-for-tests", "device": "device-s3cret-for-tests", "worker": "worker-s3cret-xyz"}
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
    """A planner with one token per role (in-process store) and a small body limit."""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    settings = Settings(
        redis_url=None,
        admin_token=ROLE_TOKENS["admin"],
        device_token=ROLE_TOKENS["device"],
        worker_token=ROLE_TOKENS["worker"],
        max_body_bytes=256 * 1024,
    )
    with serve_app_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.put(f"/models/{MODEL}", json=graph_json, headers=_role("admin"))
        assert r.status_code == 201, r.text
        yield c


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _role(name: str) -> dict[str, str]:
    return _auth(ROLE_TOKENS[name])


# ---- auth --------------------------------------------------------------------------------


def _mutations(graph_json: dict[str, Any]) -> list[tuple[str, str, Any, str]]:
    """Every mutating planner endpoint with a body it would accept, and the role it needs."""
    timings = {n["name"]: 1.0 for n in graph_json["nodes"]}
    other = {**graph_json, "model": "other"}
    beat = {"url": "http://127.0.0.1:9", "models": [MODEL], "tier": "edge", "load": 0.1}
    return [
        ("PUT", "/models/other", other, "admin"),
        ("PUT", "/models/other/profiles/dev1", {"kind": "device", "timings_ms": timings}, "admin"),
        ("DELETE", "/models/other/profiles/dev1", None, "admin"),
        ("DELETE", "/models/other", None, "admin"),
        ("POST", "/workers/heartbeat", beat, "worker"),
    ]


def test_planner_mutations_need_their_role(planner: httpx.Client, graph_json: dict[str, Any]) -> None:
    """401 (with WWW-Authenticate) without a token, with another scheme or with an unknown one
    (also a prefix / an extension / another case of a real one); 403 with a real token of
    another role (admin is no superuser); 2xx with the right role; a refused request changes
    nothing."""

    def snapshot() -> Any:
        models = planner.get("/models", headers=_role("admin")).json()
        return models, [w["url"] for w in planner.get("/workers", headers=_role("admin")).json()["workers"]]

    for method, path, body, needed in _mutations(graph_json):
        before = snapshot()
        right = ROLE_TOKENS[needed]
        refusals = [
            ({}, 401),
            ({"Authorization": "Basic " + right}, 401),
            ({"Authorization": "Bearer"}, 401),
            (_auth("wrong"), 401),
            (_auth(right[:-1]), 401),
            (_auth(right + "x"), 401),
            (_auth(right.upper()), 401),
        ]
        refusals += [(_role(other), 403) for other in ROLE_TOKENS if other != needed]
        for headers, want in refusals:
            r = planner.request(method, path, json=body, headers=headers)
            assert r.status_code == want, (method, path, headers, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            if want == 401:
                assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
            else:
                assert needed in r.json()["detail"]
        assert snapshot() == before, f"a refused {method} {path} changed the planner's state"
        r = planner.request(method, path, json=body, headers=_role(needed))
        assert r.status_code < 300, (method, path, r.text)
    assert planner.get("/workers", headers=_role("device")).json()["workers"], "the authorised heartbeat registered"


def test_planner_reads_need_a_token_and_plans_the_device_role(planner: httpx.Client) -> None:
    """Health, readiness and metrics are public; reads take a token of any role; POST /plan
    takes the device role only."""
    for path in ("/healthz", "/readyz", "/metrics"):
        assert planner.get(path).status_code == 200, path
    for path in ("/models", f"/models/{MODEL}", f"/models/{MODEL}/profiles", "/workers"):
        assert planner.get(path).status_code == 401, path
        for role in ROLE_TOKENS:
            assert planner.get(path, headers=_role(role)).status_code == 200, (path, role)
    body = {"model": MODEL, "bandwidth_mbps": 5.0}
    assert planner.post("/plan", json=body).status_code == 401
    for role in ("admin", "worker"):
        assert planner.post("/plan", json=body, headers=_role(role)).status_code == 403
    r = planner.post("/plan", json=body, headers=_role("device"))
    assert r.status_code == 200, r.text


def test_token_comparison_is_constant_time() -> None:
    """Tokens are compared in one place, `TokenSet.roles_of` (dapdee.web), with
    hmac.compare_digest against every configured token, never with == / !=; no planner module
    compares a token itself."""
    from dapdee.web.security import TokenSet

    src = inspect.getsource(TokenSet.roles_of)
    assert "hmac.compare_digest(" in src and "break" not in src and "return" in src
    tree = ast.parse("if 1:\n" + src)
    for path in [inspect.getsourcefile(TokenSet)] + sorted(
        str(p) for p in (REPO / "services" / "planner").rglob("*.py")
    ):
        module = ast.parse(Path(path).read_text()) if path != inspect.getsourcefile(TokenSet) else tree
        for node in ast.walk(module):
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq)) for o in node.ops):
                text = ast.unparse(node)
                assert "token" not in text.lower() and "secret" not in text.lower(), (path, text)
    tokens = TokenSet.of(admin="a" * 20, device="d" * 20)
    assert tokens.roles_of("a" * 20) == {"admin"} and tokens.roles_of("a" * 19 + "b") is None


# ---- token settings ----------------------------------------------------------------------

SECRET_PART = "Zq9-secret-part"  # in every refused token below: no error may repeat it
UNSENDABLE_TOKENS = {
    "trailing newline": SECRET_PART + "-abcdef\n",
    "leading space": " " + SECRET_PART + "-abcdef",
    "inner space": SECRET_PART + " abcdef",
    "tab": SECRET_PART + "\tabcdef",
    "header injection": SECRET_PART + "\r\nX-Role: admin",
    "NUL": SECRET_PART + "\x00abcdef",
    "DEL": SECRET_PART + "\x7fabcdef",
    "non-ASCII": SECRET_PART + "-t\u00f6ken",
    "no-break space": SECRET_PART + "\u00a0abcdef",
    "line separator": SECRET_PART + "\u2028abcdef",
    "too short": SECRET_PART[:15],
}
VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))  # "!" .. "~": every character a token may hold


@pytest.mark.parametrize("case", sorted(UNSENDABLE_TOKENS))
def test_role_tokens_that_cannot_be_sent_in_a_header_are_refused_at_load(case: str) -> None:
    """A role token with whitespace, control or non-ASCII characters (none of which a client can
    send in an Authorization header and the guard match), or shorter than 16 characters, is
    refused when the settings load, naming the variable and never repeating the secret; for
    every role and both services."""
    from pydantic import ValidationError

    from dapdee.edge_worker.config import Settings as EdgeSettings
    from dapdee.planner.config import Settings as PlannerSettings

    token = UNSENDABLE_TOKENS[case]
    for field in ("admin_token", "device_token", "worker_token", "api_token"):
        variable = f"DAPDEE_{field.upper()}"
        for cls, extra in ((PlannerSettings, {"redis_url": None}), (EdgeSettings, {})):
            with pytest.raises(ValidationError) as refused:
                cls(**extra, **{field: token})
            (error,) = refused.value.errors()
            assert error["loc"] == (variable,) and f"the token in {variable} " in error["msg"], error["msg"]
            assert SECRET_PART not in str(refused.value) and SECRET_PART not in error["msg"], str(refused.value)


def test_a_token_from_the_environment_is_refused_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual mistake, a secret file's trailing newline in DAPDEE_WORKER_TOKEN, stops the
    edge worker (whose own variables are DAPDEE_EDGE_*) with the variable's name."""
    from pydantic import ValidationError

    from dapdee.edge_worker.config import Settings as EdgeSettings

    monkeypatch.setenv("DAPDEE_WORKER_TOKEN", UNSENDABLE_TOKENS["trailing newline"])
    with pytest.raises(ValidationError, match="the token in DAPDEE_WORKER_TOKEN has .*trailing") as refused:
        EdgeSettings()
    assert SECRET_PART not in str(refused.value) and "DAPDEE_EDGE_WORKER_TOKEN" not in str(refused.value)


def test_only_the_dapdee_names_of_the_security_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generic `INSECURE=1` or `API_TOKEN` in the environment (another program's), or one under
    the edge's own prefix (`DAPDEE_EDGE_INSECURE`), neither opens a service nor gives it a
    token; `DAPDEE_INSECURE` and `DAPDEE_API_TOKEN` do, and code may still pass the fields by
    name."""
    from dapdee.edge_worker.config import Settings as EdgeSettings
    from dapdee.planner.config import Settings

    for name in ("INSECURE", "API_TOKEN", "ADMIN_TOKEN", "DEVICE_TOKEN", "WORKER_TOKEN"):
        for prefix in ("", "DAPDEE_EDGE_"):  # nor the edge's own prefix: the names are shared
            monkeypatch.setenv(prefix + name, "1" if name == "INSECURE" else VISIBLE_ASCII)
    for cls in (Settings, EdgeSettings):
        got = cls()
        assert not got.insecure, cls
        assert not any(getattr(got, f) for f in ("api_token", "admin_token", "device_token", "worker_token"))
    monkeypatch.setenv("DAPDEE_INSECURE", "1")
    monkeypatch.setenv("DAPDEE_API_TOKEN", VISIBLE_ASCII)
    got = Settings()
    assert got.insecure and got.api_token is not None and got.api_token.get_secret_value() == VISIBLE_ASCII
    assert Settings(insecure=False, api_token=None).insecure is False


def test_a_token_of_any_visible_ascii_is_accepted_and_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every visible ASCII character may be in a token, and 16 of them are enough: the
    settings take such tokens, and a real planner matches them in the Authorization header
    (and nothing shorter or longer); an empty variable means no token."""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    assert Settings(redis_url=None, admin_token="a" * 16).admin_token is not None
    monkeypatch.setenv("DAPDEE_DEVICE_TOKEN", "")
    monkeypatch.setenv("DAPDEE_API_TOKEN", VISIBLE_ASCII)
    settings = Settings(redis_url=None)
    assert settings.device_token is None and settings.api_token is not None
    assert settings.api_token.get_secret_value() == VISIBLE_ASCII
    with serve_app_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/models", headers=_auth(VISIBLE_ASCII)).status_code == 200
        assert c.get("/models", headers=_auth(VISIBLE_ASCII[:-1])).status_code == 401
        assert c.get("/models", headers=_auth(VISIBLE_ASCII + "!")).status_code == 401


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
    for path, role in (("/plan", "device"), (f"/models/{MODEL}", "admin"), ("/workers/heartbeat", "worker")):
        method = "PUT" if path.startswith("/models") else "POST"
        token = ROLE_TOKENS[role]
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {10 << 20}\r\n\r\n"
        ).encode()
        assert _raw(url, head + b"{").startswith(b"HTTP/1.1 413"), path
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        assert _raw(url, head + chunk * 6).startswith(b"HTTP/1.1 413"), path
    assert planner.get("/healthz").status_code == 200


def test_public_routes_answer_without_reading_a_body(planner: httpx.Client) -> None:
    """Health, metrics and the docs take no body: a request to them announcing one (within the
    body limit) and sending none is answered at once, unread, with `Connection: close`. Read,
    unauthenticated clients could fill the shared body buffer and every upload got 503."""
    url = str(planner.base_url)
    for method, path, status in (
        ("GET", "/healthz", b"200"),
        ("GET", "/metrics", b"200"),
        ("POST", "/openapi.json", b"405"),
    ):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {200_000}\r\n\r\n".encode()
        reply = _raw(url, head)
        assert reply.startswith(b"HTTP/1.1 " + status), (method, path, reply[:200])
        assert b"\r\nconnection: close\r\n" in reply.lower(), (method, path, reply[:300])


# ---- model names -------------------------------------------------------------------------

BAD_NAMES = [
    "..",
    "../etc",
    "a/b",
    "a\\b",
    ".hidden",
    "-x",
    "x" * 65,
    "a b",
    "a\x00b",
    "é",
    "a:b",
    "a*",
    "m\n",
    "m\r\n",
]


def test_model_names_are_validated(planner: httpx.Client, graph_json: dict[str, Any]) -> None:
    """Names that could become paths or key patterns are refused (4xx, never 5xx) and never stored."""
    from dapdee.models import ModelError, check_model_name

    for name in BAD_NAMES:
        with pytest.raises(ModelError):
            check_model_name(name)
        quoted = quote(name, safe="")
        body = {**graph_json, "model": name}
        r = planner.put(f"/models/{quoted}", json=body, headers=_role("admin"))
        assert 400 <= r.status_code < 500, (name, quoted, r.status_code, r.text)
        r = planner.put(
            f"/models/{MODEL}/profiles/{quoted}",
            json={"kind": "device", "timings_ms": {}},
            headers=_role("admin"),
        )
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        r = planner.post(
            "/workers/heartbeat",
            json={"url": "http://127.0.0.1:9", "models": [name], "tier": "edge", "load": 0.0},
            headers=_role("worker"),
        )
        assert r.status_code == 422, (name, r.text)
    names = {m["model"] for m in planner.get("/models", headers=_role("admin")).json()["models"]}
    assert names <= {MODEL, "other"}


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


def test_cors_is_off_by_default(planner: httpx.Client) -> None:
    """No Access-Control-Allow-* header on a cross-origin request or a preflight, so a browser
    page elsewhere cannot read answers or send credentialed mutations."""
    origin = {"Origin": "http://evil.example"}
    pre = {
        **origin,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization",
    }
    for client, path in ((planner, "/models"), (planner, "/plan")):
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
    from dapdee.device.config import PlannerConfig, RuntimeConfig
    from dapdee.device.frames import FrameFormat, random_frames
    from dapdee.device.session import DeviceSettings, open_device
    from dapdee.device.types import DeviceError
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
        wait_registered(planner.url, MODEL, [edge.url], token=TOKEN)

        def device(token: str | None) -> Any:
            pc = PlannerConfig(planner.url, "device-k100", token=token, admin_token=token)
            settings = DeviceSettings(RuntimeConfig(), pc, EDGE_SPEC, slowdown=100.0, device_load=0.0)
            return open_device(settings, loaded, dev)

        async def go() -> list[Any]:
            with pytest.raises(DeviceError, match="401"):
                async with device(None):
                    pass
            async with device(TOKEN) as rt:
                return await rt.run(random_frames(FrameFormat.of(loaded), 8))

        records = asyncio.run(go())
    finally:
        edge.kill()
        planner.kill()
    classes = loaded.run_exit(loaded.example_input()).shape[-1]
    assert len(records) == 8
    for r in records:  # every frame answered (no error, no fallback) with a class of the model
        assert r.error is None and r.where in ("edge", "local") and 0 <= r.pred_class < classes, r
    edge_frames = [r for r in records if r.where == "edge"]
    assert edge_frames, [r.where for r in records]
    assert all(r.bytes_sent > 0 and r.edge_compute_ms is not None for r in edge_frames), edge_frames
