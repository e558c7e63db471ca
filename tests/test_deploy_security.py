"""Secure defaults of the deployment (closed unless opened): docker-compose.yml, k8s/, `make secrets`.

Checked against the files as the tools read them (tests/deploy_files.py) and, where a tool can run
here, with the tool: `make secrets` writes the env file, compose's interpolation of it decides
whether the stack starts, the shipped Redis command runs under a real redis-server, the Settings
classes of the services read the variables compose and the manifests set, and (when kubectl is
installed) the documented `kubectl create secret` command runs client-side. No Docker engine and no
cluster: NetworkPolicy and Pod Security admission are evaluated by the rules written out below.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dapdee.testing import free_port
from tests.deploy_files import (
    COMPOSE,
    K8S,
    ROLE_TOKENS,
    ROOT,
    TOKEN_SECRET,
    MissingVariable,
    Served,
    by_kind,
    compose,
    compose_raw,
    compose_references,
    containers,
    dapdee_container,
    generated_secrets,
    k8s_container_env,
    k8s_expand,
    k8s_resources,
    kustomization,
    load_yaml_docs,
    make_secrets,
    pod_labels,
    pod_spec,
    published_ports,
    read_env_file,
    service_env,
    workloads,
)

DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
LOOPBACK = {"127.0.0.1", "::1"}
URL_SAFE = re.compile(r"[A-Za-z0-9_-]{32,}")
SECRET_CMD = re.compile(r"kubectl[^\n`]*create secret generic " + TOKEN_SECRET + r"[^\n`]*")


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The variables compose reads: the env file `make secrets` writes (into a temp dir)."""
    return generated_secrets(tmp_path_factory.mktemp("secrets"))


def required_compose_variables() -> set[str]:
    return {name for name, _ in compose_references(COMPOSE.read_text())}


def secret_refs(resources: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(workload, container, secretKeyRef or secretRef) of every Secret reference in a pod template."""
    out = []
    for name, w in workloads(resources).items():
        for c in containers(w):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    out.append((name, c["name"], ref))
            for ef in c.get("envFrom", []):
                if "secretRef" in ef:
                    out.append((name, c["name"], ef["secretRef"]))
    return out


# ---- make secrets ---------------------------------------------------------------------------


def test_make_secrets_writes_what_compose_and_k8s_read(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    r = make_secrets(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "the secrets file must be private"
    env = read_env_file(path)
    needed = required_compose_variables() | {ref["key"] for _, _, ref in secret_refs(k8s_resources())}
    assert needed <= set(env), f"make secrets does not write {sorted(needed - set(env))}"
    for name, value in env.items():
        assert URL_SAFE.fullmatch(value), f"{name}: not a long URL-safe random value"
    assert len(set(env.values())) == len(env), "every secret is drawn separately"
    compose(env)  # interpolates: compose would start
    again = tmp_path / "again.env"
    assert make_secrets(again).returncode == 0
    assert not set(read_env_file(again).values()) & set(env.values()), "values are random, not fixed"


def test_make_secrets_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "stack.env"
    assert make_secrets(path).returncode == 0
    before = path.read_bytes()
    r = make_secrets(path)
    assert r.returncode == 0 and path.read_bytes() == before, "a second run changed the file"
    # a file of the user's own: values kept, the missing names appended
    mine = tmp_path / "mine.env"
    mine.write_text("# mine\nDAPDEE_ADMIN_TOKEN=my-own-admin-token-that-stays-as-it-is\nOTHER=1")
    original = mine.read_text()
    r = make_secrets(mine)
    assert r.returncode == 0, r.stderr
    text = mine.read_text()
    assert text.startswith(original), "make secrets rewrote a value it was given"
    env = read_env_file(mine)
    assert env["DAPDEE_ADMIN_TOKEN"] == "my-own-admin-token-that-stays-as-it-is" and env["OTHER"] == "1"
    assert set(ROLE_TOKENS) <= set(env)
    # an empty value is refused, naming it, and nothing is written
    empty = tmp_path / "empty.env"
    empty.write_text("DAPDEE_DEVICE_TOKEN=\n")
    r = make_secrets(empty)
    assert r.returncode != 0 and "DAPDEE_DEVICE_TOKEN" in r.stderr, r.stdout + r.stderr
    assert empty.read_text() == "DAPDEE_DEVICE_TOKEN=\n"
    # so is a value compose would interpolate or a Redis config line / URL would split
    unsafe = tmp_path / "unsafe.env"
    unsafe.write_text("DAPDEE_REDIS_PASSWORD=pa$$ word\n")
    r = make_secrets(unsafe)
    assert r.returncode != 0 and "DAPDEE_REDIS_PASSWORD" in r.stderr, r.stdout + r.stderr
    assert unsafe.read_text() == "DAPDEE_REDIS_PASSWORD=pa$$ word\n"
    # and lines compose takes but `kubectl create secret --from-env-file` refuses (make k8s-secret)
    for name, text, why in (
        ("export.env", "export DAPDEE_ADMIN_TOKEN=my-own-admin-token-that-stays\n", "export"),
        ("twice.env", "DAPDEE_ADMIN_TOKEN=first-value-of-the-token\nDAPDEE_ADMIN_TOKEN=second-one-x\n", "twice"),
    ):
        bad = tmp_path / name
        bad.write_text(text)
        r = make_secrets(bad)
        assert r.returncode != 0 and "DAPDEE_ADMIN_TOKEN" in r.stderr and why in r.stderr, r.stdout + r.stderr
        assert bad.read_text() == text


def test_secrets_file_is_never_committed_nor_in_the_image() -> None:
    m = re.search(r"^SECRETS_FILE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile: no SECRETS_FILE default"
    default = m.group(1)
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        for rel in (default, "k8s/prod.env", "deploy/stack.env"):
            r = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", rel], timeout=30)
            assert r.returncode == 0, f"{rel} is not gitignored"
        tracked = subprocess.run(
            [git, "-C", str(ROOT), "ls-files"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        assert not [t for t in tracked if t.endswith(".env")], "an env file is committed"
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert default in ignored and "*.env" in ignored, ".dockerignore lets secrets files into the build context"


# ---- docker compose -------------------------------------------------------------------------


def test_compose_refuses_to_start_without_the_secrets(stack_env: dict[str, str]) -> None:
    refs = compose_references(COMPOSE.read_text())
    assert refs, "compose takes nothing from the env file"
    for name, op in refs:
        assert op == ":?", f"${{{name}}} must be required (${{{name}:?...}}): no default secret"
    for name in required_compose_variables():
        for env in ({k: v for k, v in stack_env.items() if k != name}, {**stack_env, name: ""}):
            with pytest.raises(MissingVariable) as exc:
                compose(env)
            assert exc.value.name == name and "make secrets" in str(exc.value)


def test_compose_publishes_nothing_beyond_loopback() -> None:
    svcs = compose_raw()["services"]
    for name, s in svcs.items():
        assert "network_mode" not in s, f"{name}: network_mode bypasses the port rules"
        for ip, host, container in published_ports(s):
            assert ip in LOOPBACK, f"{name}: publishes {host}:{container} on all interfaces, not 127.0.0.1"
    assert not published_ports(svcs["redis"]), "Redis is published on the host"
    # negative control: the parser does see all-interface bindings
    assert [ip for ip, _, _ in published_ports({"ports": ["8000:8000", "8001", "0.0.0.0:1:1"]})] == [
        "",
        "",
        "0.0.0.0",
    ]


def test_compose_lets_only_the_planner_reach_redis() -> None:
    """Redis shares a network with the planner alone, and that network has no route out; a
    service that names no network is on `default` (compose's rule)."""
    raw = compose_raw()
    nets = {name: set(s.get("networks", ["default"])) for name, s in raw["services"].items()}
    assert nets["redis"] and "default" not in nets["redis"], nets["redis"]
    sharing = {name for name, n in nets.items() if name != "redis" and n & nets["redis"]}
    assert sharing == {"planner"}, sharing
    for net in nets["redis"]:
        assert raw["networks"][net].get("internal") is True, f"{net}: not internal"
    assert "default" in nets["planner"], "the workers and devices reach the planner on default"


def test_compose_services_get_the_role_tokens(monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> None:
    raw = compose_raw()["services"]
    svcs = compose(stack_env)["services"]
    ours = {name: s for name, s in svcs.items() if "build" in s}
    edges = []
    for name, s in ours.items():
        served = Served(list(s["command"]), service_env(s), monkeypatch)
        for token in ROLE_TOKENS:
            assert re.fullmatch(r"\$\{" + token + r":\?[^}]*\}", str(raw[name]["environment"].get(token))), (
                f"{name}: {token} must come from the env file"
            )
            assert served.setting(token) == stack_env[token], f"{name}: does not read {token}"
        if served.service == "edge":
            edges.append(served.settings.public_url)
        else:
            redis_url = urllib.parse.urlsplit(served.settings.redis_url)
            assert redis_url.hostname == "redis" and redis_url.password == stack_env["DAPDEE_REDIS_PASSWORD"]
            pattern = served.setting("DAPDEE_WORKER_URL_PATTERN")
    assert edges
    check_worker_pattern(pattern, edges, host_of=lambda u: urllib.parse.urlsplit(u).hostname or "")


def test_compose_containers_are_hardened(stack_env: dict[str, str]) -> None:
    svcs = compose(stack_env)["services"]
    for name, s in svcs.items():
        if "build" in s:
            assert s.get("read_only") is True, f"{name}: root file system not read-only"
            assert "/tmp" in s.get("tmpfs", []), f"{name}: no writable /tmp"
        if "build" in s or name == "redis":
            assert "ALL" in s.get("cap_drop", []), f"{name}: capabilities not dropped"
            assert "no-new-privileges:true" in s.get("security_opt", []), f"{name}: no no-new-privileges"
    assert svcs["redis"].get("user") not in (None, "root", "0"), "Redis runs as root"
    grafana = service_env(svcs["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == stack_env["DAPDEE_GRAFANA_PASSWORD"]
    assert grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false").lower() == "false", "Grafana admits anonymous users"
    assert not any("enable-lifecycle" in a for a in svcs["prometheus"]["command"]), "Prometheus remote quit"


def check_worker_pattern(pattern: str, good: list[str], host_of: Any) -> None:
    """The planner's worker-URL pattern fullmatches every URL the shipped workers advertise and
    none of the look-alikes an attacker with a worker token could register instead."""
    rx = re.compile(pattern)
    for url in good:
        assert rx.fullmatch(url), f"DAPDEE_WORKER_URL_PATTERN {pattern!r} refuses the worker URL {url}"
        parts = urllib.parse.urlsplit(url)
        host, port = host_of(url), parts.port
        bad = [
            f"http://{host}.evil.example:{port}",
            f"http://{host}:{port}.evil.example",
            f"http://evil.example/{host}:{port}",
            f"http://user@{host}:{port}",
            f"http://{host}:{port}/x",
            f"http://{host}:{(port or 0) + 1}",
            "http://evil.example:8000",
            "http://127.0.0.1:8000",
        ]
        for b in bad:
            assert not rx.fullmatch(b), f"DAPDEE_WORKER_URL_PATTERN {pattern!r} admits {b}"


# ---- Redis: password, noeviction, the command as shipped ------------------------------------


@dataclass(frozen=True)
class RedisShape:
    """How a manifest runs Redis: the shell script, its environment, the health probe command."""

    where: str
    script: str
    env: dict[str, str]
    probe: list[str]
    planner_url: str


def redis_shapes(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[RedisShape]:
    """The compose and the Kubernetes Redis, with the planner's DAPDEE_REDIS_URL of each."""
    svcs = compose(stack_env)["services"]
    redis = svcs["redis"]
    assert redis["command"][:2] == ["sh", "-c"], "compose redis: expected sh -c SCRIPT"
    test = redis["healthcheck"]["test"]
    probe = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else list(test[1:])
    planner = next(s for s in svcs.values() if "build" in s and s["command"][0] == "planner")
    out = [
        RedisShape("compose", redis["command"][2], service_env(redis), probe, service_env(planner)["DAPDEE_REDIS_URL"])
    ]
    res = k8s_resources()
    cms = by_kind(res, "ConfigMap")
    dep = workloads(res)["redis"]
    (c,) = pod_spec(dep)["containers"]
    env = k8s_container_env(c, cms, {TOKEN_SECRET: stack_env})
    assert c["command"][:2] == ["sh", "-c"], "k8s redis: expected sh -c SCRIPT"
    planner_c = dapdee_container(workloads(res)["planner"])
    assert planner_c is not None
    planner_env = k8s_container_env(planner_c, cms, {TOKEN_SECRET: stack_env})
    probe_k8s = [k8s_expand(a, env) for a in c["readinessProbe"]["exec"]["command"]]
    out.append(RedisShape("k8s", k8s_expand(c["command"][2], env), env, probe_k8s, planner_env["DAPDEE_REDIS_URL"]))
    return out


def redis_options(script: str) -> dict[str, str]:
    """`--name value` options of the redis-server line of a script."""
    line = next(ln for ln in script.splitlines() if "redis-server" in ln)
    words = shlex.split(line.split("<<")[0])
    return {w[2:]: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}


def test_redis_requires_a_password_and_never_evicts(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    password = stack_env["DAPDEE_REDIS_PASSWORD"]
    sizes = set()
    for shape in redis_shapes(stack_env, monkeypatch):
        assert shape.env.get("REDISCLI_AUTH") == password, f"{shape.where}: Redis password not from the secrets"
        assert re.search(r"^requirepass \$REDISCLI_AUTH$", shape.script, re.M), f"{shape.where}: no requirepass"
        assert password not in shape.script, f"{shape.where}: password written into the command"
        opts = redis_options(shape.script)
        assert opts.get("maxmemory-policy") == "noeviction", f"{shape.where}: {opts}"
        sizes.add(opts.get("maxmemory"))
        url = urllib.parse.urlsplit(shape.planner_url)
        assert url.password == password and url.hostname == "redis", f"{shape.where}: planner URL {url.hostname}"
    assert len(sizes) == 1 and None not in sizes, f"compose and k8s differ on maxmemory: {sizes}"
    (size,) = sizes
    assert f"maxmemory {size}" in DEPLOY_DOC.read_text(), "docs/DEPLOY.md does not state the Redis maxmemory"
    k8s_redis = workloads(k8s_resources())["redis"]
    limit = pod_spec(k8s_redis)["containers"][0]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi") and int(limit[:-2]) > int(size.removesuffix("mb")), "memory limit <= maxmemory"


@pytest.fixture
def redis_runner() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (each in its own session); killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_shipped_redis_command_runs_closed(
    where: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, redis_runner: list[Any]
) -> None:
    """The Redis script as shipped, under a real redis-server on a private loopback port: no
    password, no access; the password (never on its command line) admits; the probe passes only
    with it; noeviction is in force; the planner's URL connects."""
    import redis

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server not installed (apt-get install redis-server; `make test` does it)")
    shape = next(s for s in redis_shapes(stack_env, monkeypatch) if s.where == where)
    password = stack_env["DAPDEE_REDIS_PASSWORD"]
    port = free_port()
    script = shape.script.replace("redis-server - ", f"redis-server - --port {port} --bind 127.0.0.1 ", 1)
    assert script != shape.script, "the script does not start `redis-server -` (config on stdin)"
    base = {"PATH": os.environ["PATH"]}
    # without a password the script refuses to start Redis open
    r = subprocess.run(["sh", "-c", script], env={**base, "REDISCLI_AUTH": ""}, capture_output=True, timeout=20)
    assert r.returncode != 0 and b"password" in r.stderr, r
    p = subprocess.Popen(
        ["sh", "-c", script],
        env={**base, "REDISCLI_AUTH": password},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    redis_runner.append(p)
    client = redis.Redis(port=port, password=password, socket_timeout=2)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert p.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, socket_timeout=2).get("x")
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert password.encode() not in Path(f"/proc/{p.pid}/cmdline").read_bytes(), "password on the command line"
    probe = [a.replace("redis-cli", f"redis-cli -p {port}") for a in shape.probe]
    assert subprocess.run(probe, env={**base, "REDISCLI_AUTH": password}, timeout=20).returncode == 0
    assert subprocess.run(probe, env={**base, "REDISCLI_AUTH": "wrong"}, timeout=20).returncode != 0
    url = urllib.parse.urlsplit(shape.planner_url)
    local = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
    assert redis.Redis.from_url(local, socket_timeout=2).ping()
    client.shutdown(nosave=True)


# ---- Kubernetes: the Secret -----------------------------------------------------------------


def test_k8s_secret_is_required_and_never_shipped(stack_env: dict[str, str], tmp_path: Path) -> None:
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml_docs(path):
            assert doc.get("kind") != "Secret", f"{path.relative_to(ROOT)} ships a Secret"
            assert "secretGenerator" not in doc, f"{path.relative_to(ROOT)} generates a Secret"
    refs = secret_refs(k8s_resources())
    assert refs
    for w, c, ref in refs:
        assert ref["name"] == TOKEN_SECRET, f"{w}/{c}: unknown Secret {ref['name']}"
        assert ref.get("optional") is not True, f"{w}/{c}: Secret reference is optional (runs open without it)"
        if "key" in ref:
            assert ref["key"] in stack_env, f"{w}/{c}: key {ref['key']} is not written by make secrets"
    # the documented command makes the Secret from the `make secrets` file
    documented = SECRET_CMD.findall(DEPLOY_DOC.read_text())
    assert documented, f"docs/DEPLOY.md does not show `kubectl create secret generic {TOKEN_SECRET}`"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    env_file = tmp_path / "stack.env"
    assert make_secrets(env_file).returncode == 0
    argv = [a for a in shlex.split(documented[0]) if not a.startswith("--from-env-file")]
    argv = [kubectl, *argv[1:], f"--from-env-file={env_file}", "--dry-run=client", "-o", "json"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import base64
    import json

    data = {k: base64.b64decode(v).decode() for k, v in json.loads(r.stdout)["data"].items()}
    assert data == read_env_file(env_file), "kubectl reads the env file differently"
    assert {ref["key"] for _, _, ref in refs if "key" in ref} <= set(data)


def test_k8s_dapdee_containers_get_the_role_tokens(monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> None:
    res = k8s_resources()
    cms = by_kind(res, "ConfigMap")
    seen = set()
    for name, w in workloads(res).items():
        c = dapdee_container(w)
        if c is None:
            continue
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])}
        for token in ROLE_TOKENS:
            ref = refs.get(token)
            assert ref and ref["name"] == TOKEN_SECRET and ref["key"] == token, f"{name}: {token} not from the Secret"
        env = k8s_container_env(
            c, cms, {TOKEN_SECRET: stack_env}, {"metadata.name": f"{name}-0", "metadata.namespace": "x"}
        )
        served = Served([k8s_expand(a, env) for a in c["args"]], env, monkeypatch)
        seen.add(served.service)
        for token in ROLE_TOKENS:
            assert served.setting(token) == stack_env[token], f"{name}: does not read {token}"
    assert seen == {"planner", "edge"}


def test_k8s_worker_url_pattern_admits_exactly_the_edge_pods(
    monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]
) -> None:
    res = k8s_resources()
    cms = by_kind(res, "ConfigMap")
    services = by_kind(res, "Service")
    ws = workloads(res)
    planner_c = dapdee_container(ws["planner"])
    assert planner_c is not None
    penv = k8s_container_env(planner_c, cms, {TOKEN_SECRET: stack_env})
    pattern = Served(list(planner_c["args"]), penv, monkeypatch).setting("DAPDEE_WORKER_URL_PATTERN")
    hpa_max = [
        d["spec"]["maxReplicas"]
        for d in [*res, *(doc for p in (K8S / "optional").glob("*.yaml") for doc in load_yaml_docs(p))]
        if d["kind"] == "HorizontalPodAutoscaler"
    ]
    urls = []
    for name, w in ws.items():
        c = dapdee_container(w)
        if c is None or c["args"][0] != "edge":
            continue
        assert w["kind"] == "StatefulSet", f"{name}: pods need stable DNS names (a StatefulSet)"
        ns, gov = w["metadata"]["namespace"], w["spec"]["serviceName"]
        assert services[gov]["spec"].get("clusterIP") == "None", f"{gov}: not headless, pods get no DNS names"
        for i in range(max(hpa_max)):
            pod = f"{name}-{i}"
            env = k8s_container_env(c, cms, {TOKEN_SECRET: stack_env}, {"metadata.name": pod, "metadata.namespace": ns})
            url = Served([k8s_expand(a, env) for a in c["args"]], env, monkeypatch).settings.public_url
            # the pod's DNS name as the cluster DNS serves it: POD.GOVERNING-SERVICE.NAMESPACE.svc
            assert urllib.parse.urlsplit(url).hostname == f"{pod}.{gov}.{ns}.svc", url
            urls.append(url)
        wrong_ns = url.replace(f".{ns}.svc", ".other.svc")
        assert not re.fullmatch(pattern, wrong_ns), f"pattern admits another namespace: {wrong_ns}"
    assert urls, "no edge workers"
    assert kustomization()["namespace"] in pattern.replace("\\.", "."), "pattern not for the kustomize namespace"
    check_worker_pattern(pattern, urls, host_of=lambda u: urllib.parse.urlsplit(u).hostname or "")


# ---- Kubernetes: NetworkPolicy --------------------------------------------------------------


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels, matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": not (key in labels and labels[key] in values),
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ns_labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # container port names


def port_admitted(rule_ports: list[dict[str, Any]] | None, port: int, dst: Pod) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        want = p.get("port")
        if want is None or (isinstance(want, str) and dst.ports.get(want) == port):
            return True
        if isinstance(want, int) and want <= port <= p.get("endPort", want):
            return True
    return False


def peer_admitted(peer: dict[str, Any], policy_ns: str, src: Pod | None) -> bool:
    """Whether a `from` peer covers `src` (None: a client outside the cluster). An ipBlock is
    taken to cover every source (pod IPs may fall in it): the conservative reading."""
    if "ipBlock" in peer:
        return True
    if src is None:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], src.ns_labels)
    else:
        ns_ok = src.namespace == policy_ns
    return ns_ok and selects(peer.get("podSelector"), src.labels)


def ingress_allowed(policies: list[dict[str, Any]], src: Pod | None, dst: Pod, port: int) -> bool:
    """NetworkPolicy ingress semantics: a pod no policy selects takes everything; a selected pod
    takes what some rule of a selecting policy admits (the union). O(policies x rules x peers)."""
    applicable = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst.namespace
        and selects(p["spec"]["podSelector"], dst.labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applicable:
        return True
    for p in applicable:
        for rule in p["spec"].get("ingress") or []:
            if not port_admitted(rule.get("ports"), port, dst):
                continue
            peers = rule.get("from")
            if not peers or any(peer_admitted(peer, p["metadata"]["namespace"], src) for peer in peers):
                return True
    return False


def cluster_pods(res: list[dict[str, Any]]) -> dict[str, Pod]:
    ns_labels = {n: d["metadata"].get("labels", {}) for n, d in by_kind(res, "Namespace").items()}
    out = {}
    for name, w in workloads(res).items():
        ns = w["metadata"]["namespace"]
        ports = {p["name"]: p["containerPort"] for c in containers(w) for p in c.get("ports", []) if "name" in p}
        out[name] = Pod(name, ns, pod_labels(w), ns_labels.get(ns, {}), ports)
    return out


def test_network_policy_lets_only_the_planner_reach_redis() -> None:
    res = k8s_resources()
    policies = list(by_kind(res, "NetworkPolicy").values())
    pods = cluster_pods(res)
    ws = workloads(res)
    redis = pods["redis"]
    ns = redis.namespace
    assert ingress_allowed([], None, redis, 6379), "evaluator control: no policy admits everything"
    strangers = {
        "a pod of another app in the namespace": Pod("debug", ns, {"app.kubernetes.io/name": "debug"}),
        "a pod labelled like the planner in another namespace": Pod(
            "fake", "other", dict(pods["planner"].labels), {"kubernetes.io/metadata.name": "other"}
        ),
        "a client outside the cluster": None,
    }
    users = {
        n
        for n, w in ws.items()
        if any(e["name"] == "DAPDEE_REDIS_URL" for c in containers(w) for e in c.get("env", []))
    }
    assert users == {"planner"}
    for name, pod in pods.items():
        want = name in users
        assert ingress_allowed(policies, pod, redis, 6379) is want, f"{name} -> redis:6379 admitted={not want}"
    for what, src in strangers.items():
        assert not ingress_allowed(policies, src, redis, 6379), f"{what} reaches Redis"
        for name in ("planner", "edge-worker"):  # devices and Prometheus reach the HTTP port only
            assert ingress_allowed(policies, src, pods[name], 8000), f"{what} cannot reach {name}:8000"
            assert not ingress_allowed(policies, src, pods[name], 9999), f"{what} reaches {name}:9999"
    assert not ingress_allowed(policies, pods["planner"], redis, 6380), "Redis admits other ports"
    # every pod is selected by some policy: a port nobody opened stays closed
    for name, pod in pods.items():
        assert any(selects(p["spec"]["podSelector"], pod.labels) for p in policies), f"{name}: no NetworkPolicy"


# ---- Kubernetes: Pod Security Standards, `restricted` ---------------------------------------

RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"
}  # fmt: skip


def restricted_violations(w: dict[str, Any]) -> list[str]:
    """What the Pod Security `restricted` profile (Kubernetes 1.30: baseline + restricted rules)
    refuses in a workload's pod template, plus read-only root file systems. O(containers)."""
    spec = pod_spec(w)
    psc = spec.get("securityContext", {})
    out = [f"pod {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    out += [f"volume {v['name']}: type" for v in spec.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    if psc.get("runAsUser") == 0 or "sysctls" in psc or "seLinuxOptions" in psc:
        out.append("pod securityContext: root user, sysctls or SELinux options")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    for c in containers(w):
        sc, n = c.get("securityContext", {}), c["name"]
        caps = sc.get("capabilities", {})
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        checks = {
            "privileged": sc.get("privileged") is not True,
            "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
            "runAsNonRoot": sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True,
            "runAsUser != 0": sc.get("runAsUser", psc.get("runAsUser")) != 0,
            "seccompProfile RuntimeDefault/Localhost": seccomp in ("RuntimeDefault", "Localhost"),
            "capabilities drop ALL": "ALL" in caps.get("drop", []),
            "capabilities add only NET_BIND_SERVICE": set(caps.get("add", [])) <= {"NET_BIND_SERVICE"},
            "no hostPort": not any(p.get("hostPort") for p in c.get("ports", [])),
            "procMount Default": sc.get("procMount", "Default") == "Default",
            "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
        }
        out += [f"container {n}: {what}" for what, ok in checks.items() if not ok]
    return out


def test_namespace_enforces_the_restricted_profile() -> None:
    res = k8s_resources()
    (ns,) = by_kind(res, "Namespace").values()
    labels = ns["metadata"].get("labels", {})
    for mode in ("enforce", "audit", "warn"):
        assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", f"namespace: {mode} label"
    for name, w in workloads(res).items():
        assert w["metadata"]["namespace"] == ns["metadata"]["name"]
        assert restricted_violations(w) == [], f"{name}: {restricted_violations(w)}"
        assert pod_spec(w).get("automountServiceAccountToken") is False, f"{name}: needs no API token"
    # negative control: the check does see a violation
    bad = copy.deepcopy(workloads(res)["planner"])
    pod_spec(bad)["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")
    assert restricted_violations(bad) == ["container planner: allowPrivilegeEscalation: false"]


def test_read_only_pods_have_their_writable_paths() -> None:
    """With a read-only root, every path the app writes is an emptyDir: /tmp for every DAPDEE
    container, and the edge profile cache directory the ConfigMap names."""
    res = k8s_resources()
    cms = by_kind(res, "ConfigMap")
    for name, w in workloads(res).items():
        c = dapdee_container(w)
        if c is None:
            continue
        empty = {v["name"] for v in pod_spec(w).get("volumes", []) if "emptyDir" in v}
        writable = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in empty and not m.get("readOnly")]
        assert "/tmp" in writable, f"{name}: no writable /tmp"
        cache = k8s_container_env(c, cms).get("DAPDEE_EDGE_PROFILE_CACHE")
        if c["args"][0] == "edge":
            assert cache, f"{name}: measured profiles are lost on every container restart"
        if cache:
            assert any(cache == m or cache.startswith(m.rstrip("/") + "/") for m in writable), (
                f"{name}: profile cache {cache} is on the read-only root"
            )
