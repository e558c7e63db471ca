"""Deployment files: docker-compose.yml, Dockerfile, k8s/, deploy/ (Prometheus, Grafana).

Everything is checked offline, against the real code: Kubernetes manifests against the
Kubernetes JSON schemas in strict mode (kubernetes-validate), commands against the real
`dapdee` argument parser, environment variables against the services' real Settings classes,
probe and healthcheck paths against the real FastAPI apps' routes, the Prometheus config with
`promtool`, and the Grafana dashboard's queries against the metrics that a live planner and
edge worker (started here on 127.0.0.1) export and against a real Prometheus server scraping
them. Everything started here is killed at the end. The variables compose interpolates come
from a file `make secrets` writes; the secure defaults themselves (secrets, exposure, Redis,
NetworkPolicy, Pod Security) are checked in tests/test_deploy_security.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dapdee.testing import free_port
from tests.deploy_files import (
    DAPDEE_SERVICES,
    K8S,
    ROOT,
    TOKEN_SECRET,
    Served,
    by_kind,
    compose,
    compose_raw,
    containers,
    dapdee_container,
    env_names,
    generated_secrets,
    k8s_container_env,
    k8s_expand,
    k8s_resources,
    kustomization,
    load_yaml_docs,
    parse_serve,
    pod_labels,
    published_ports,
    service_env,
    settings_classes,
    strip_private,
    workloads,
)

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dapdee.json"
K8S_VERSION = "1.30.0"
EDGE_TEST_SPEC = "zoo:alexnet?width=0.25&in_channels=1"
BOUNDED_S = 90.0  # every wait in the live tests ends by then


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The variables compose reads: the env file `make secrets` writes (into a temp dir)."""
    return generated_secrets(tmp_path_factory.mktemp("secrets"))


# ---- helpers --------------------------------------------------------------------------------


def make_app(service: str) -> Any:
    """The service's app as `create_app` builds it (nothing is started; no model is loaded
    before the lifespan runs)."""
    settings = settings_classes()[service]
    if service == "planner":
        from dapdee.planner.app import create_app

        return create_app(settings(redis_url=None))
    from dapdee.edge_worker.app import create_app as create_edge_app

    return create_edge_app(settings(models=EDGE_TEST_SPEC))


_APPS: dict[str, Any] = {}


def serves(service: str, method: str, path: str) -> bool:
    """Whether the real app of `service` has a route for `method path` (Starlette's own matching,
    so routers included in any way count)."""
    from starlette.routing import Match

    if service not in _APPS:
        _APPS[service] = make_app(service)
    app = _APPS[service]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [],
        "query_string": b"",
        "app": app,
    }
    return any(r.matches(scope)[0] == Match.FULL for r in app.router.routes)


def assert_get_route(service: str, path: str, where: str) -> None:
    if not serves(service, "GET", path):
        known = sorted(_APPS[service].openapi().get("paths", {}))
        pytest.fail(f"{where}: GET {path} is not served by the {service} app (its API: {known})")


# ---- Kubernetes -----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kz = kustomization()
    assert kz["apiVersion"].startswith("kustomize.config.k8s.io/") and kz["kind"] == "Kustomization"
    listed = set(kz["resources"])
    for rel in listed:
        assert (K8S / rel).is_file(), f"kustomization.yaml lists {rel}, which does not exist"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed, f"k8s/*.yaml not in kustomization.yaml: {sorted(on_disk - listed)}"
    namespaces = by_kind(k8s_resources(), "Namespace")
    assert kz["namespace"] in namespaces, "kustomization's namespace is not created by the manifests"
    # `make k8s-secret` puts the tokens' Secret where the pods read it
    made = subprocess.run(["make", "-n", "k8s-secret"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"kubectl -n {kz['namespace']} create secret" in made, made
    image_names = {i["name"] for i in kz.get("images", [])}
    for d in workloads(k8s_resources()).values():
        c = dapdee_container(d)
        if c is not None:
            assert c["image"].split(":")[0] in image_names, f"{c['image']} is not retargetable by kustomize"


def all_k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", all_k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_validates_strict(path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = load_yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}")


def test_strict_validation_rejects_unknown_fields() -> None:
    """Negative control: the validator used above really is strict (a typo'd field fails)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deploy = strip_private(copy.deepcopy(by_kind(k8s_resources(), "Deployment")["planner"]))
    kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)
    deploy["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)


def test_deployments_services_and_selectors() -> None:
    res = k8s_resources()
    deployments = workloads(res)
    assert {"redis", "planner", "edge-worker"} <= set(deployments)
    assert deployments["planner"]["spec"]["replicas"] >= 2, "planners are stateless: run at least 2"
    for name, d in deployments.items():
        sel = d["spec"]["selector"]["matchLabels"]
        assert sel.items() <= pod_labels(d).items(), f"{d['kind']} {name}: selector does not match its pod labels"
        if d["kind"] == "StatefulSet":  # its pods' DNS names come from a headless governing Service
            gov = by_kind(res, "Service").get(d["spec"]["serviceName"])
            assert gov is not None and gov["spec"].get("clusterIP") == "None", (
                f"StatefulSet {name}: serviceName {d['spec']['serviceName']} is not a headless Service"
            )
            assert gov["spec"]["selector"].items() <= pod_labels(d).items()
    services = by_kind(res, "Service")
    assert {"redis", "planner", "edge-worker"} <= set(services)
    for name, s in services.items():
        sel = s["spec"]["selector"]
        matches = [
            d
            for d in deployments.values()
            if d["metadata"]["namespace"] == s["metadata"]["namespace"] and sel.items() <= pod_labels(d).items()
        ]
        assert matches, f"Service {name} selects no workload's pods ({sel})"
        for port in s["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for d in matches:
                cports = [p for c in containers(d) for p in c.get("ports", [])]
                if isinstance(target, str):
                    ok = any(p.get("name") == target for p in cports)
                else:
                    ok = any(p["containerPort"] == target for p in cports)
                assert ok, f"Service {name}: targetPort {target!r} is not a port of {d['metadata']['name']}"


def test_the_single_redis_is_replaced_never_doubled() -> None:
    """One Redis holds the leases, models and registry: a rolling update (the Deployment default,
    surge 1) would make a new, empty one ready behind the Service while the old one still
    serves, and planners would split their state between the two. Recreate stops the old
    one first."""
    redis = workloads(k8s_resources())["redis"]
    assert redis["kind"] == "Deployment" and redis["spec"]["replicas"] == 1
    assert redis["spec"].get("strategy", {}).get("type") == "Recreate", redis["spec"].get("strategy")


def test_hpa_and_pdbs_target_existing_workloads() -> None:
    res = k8s_resources()
    deployments = workloads(res)
    hpas = by_kind(res, "HorizontalPodAutoscaler")
    assert hpas, "no HorizontalPodAutoscaler"
    for name, h in hpas.items():
        assert h["apiVersion"] == "autoscaling/v2"
        ref = h["spec"]["scaleTargetRef"]
        assert ref["name"] in deployments and ref["kind"] == deployments[ref["name"]]["kind"], (
            f"HPA {name} targets nothing"
        )
        target = deployments[ref["name"]]
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
        for m in h["spec"]["metrics"]:
            if m["type"] == "Resource":
                res_name = m["resource"]["name"]
                for c in containers(target):
                    assert res_name in c.get("resources", {}).get("requests", {}), (
                        f"HPA {name} scales on {res_name} utilisation but container {c['name']} requests none"
                    )
    assert "edge-worker" in {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()}
    pdbs = by_kind(res, "PodDisruptionBudget")
    assert any(p["metadata"]["name"] == "edge-worker" for p in pdbs.values()), "no PDB for the edge workers"
    for name, p in pdbs.items():
        sel = p["spec"]["selector"]["matchLabels"]
        matches = [d for d in deployments.values() if sel.items() <= pod_labels(d).items()]
        assert len(matches) == 1, f"PDB {name} selects {len(matches)} workloads"
        target = matches[0]["metadata"]["name"]
        scaled = [
            h["spec"].get("minReplicas", 1) for h in hpas.values() if h["spec"]["scaleTargetRef"]["name"] == target
        ]
        # with an HPA the workload leaves `replicas` to it (kubectl apply would undo scaling)
        if scaled:
            assert "replicas" not in matches[0]["spec"], f"{target}: drop replicas, the HPA owns it"
        floor = min(scaled) if scaled else matches[0]["spec"].get("replicas", 1)
        if "minAvailable" in p["spec"]:
            assert int(p["spec"]["minAvailable"]) < floor, f"PDB {name} would block every voluntary eviction"


def test_optional_hpa_uses_the_real_inflight_metric() -> None:
    """The custom-metric HPA (k8s/optional) scales on a gauge the edge worker really has."""
    from dapdee.edge_worker.metrics import EdgeMetrics

    gauges = {m.name for m in EdgeMetrics().registry.collect() if m.type == "gauge"}
    deployments = workloads(k8s_resources())
    for path in sorted((K8S / "optional").glob("*.yaml")):
        for doc in load_yaml_docs(path):
            if doc["kind"] != "HorizontalPodAutoscaler":
                continue
            ref = doc["spec"]["scaleTargetRef"]
            assert ref["name"] in deployments and ref["kind"] == deployments[ref["name"]]["kind"]
            for m in doc["spec"]["metrics"]:
                if m["type"] == "Pods":
                    assert m["pods"]["metric"]["name"] in gauges, f"{path.name}: unknown metric"


def test_every_container_has_resources_and_runs_as_non_root() -> None:
    def qty(v: str | int) -> float:
        s = str(v)
        units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
        for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if s.endswith(u):
                return float(s[: -len(u)]) * f
        return float(s)

    for name, d in workloads(k8s_resources()).items():
        pod = d["spec"]["template"]["spec"]
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: not runAsNonRoot"
        for c in containers(d):
            r = c.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in r.get(kind, {}), f"{name}/{c['name']}: no {kind}.{res}"
                    if kind == "limits":
                        assert qty(r["requests"][res]) <= qty(r["limits"][res]), f"{name}: request > limit"
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{name}/{c['name']}: no {probe}"


def test_configmap_and_secret_references_exist() -> None:
    res = k8s_resources()
    cms = by_kind(res, "ConfigMap")
    used: set[tuple[str, str]] = set()
    for name, d in workloads(res).items():
        for c in containers(d):
            for e in c.get("env", []):
                vf = e.get("valueFrom", {})
                if "configMapKeyRef" in vf:
                    ref = vf["configMapKeyRef"]
                    assert ref["name"] in cms, f"{name}: env {e['name']} refers to missing ConfigMap {ref['name']}"
                    assert ref["key"] in cms[ref["name"]]["data"], f"{name}: ConfigMap key {ref['key']} missing"
                    used.add((ref["name"], ref["key"]))
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    assert ef["configMapRef"]["name"] in cms
                    used.update((ef["configMapRef"]["name"], k) for k in cms[ef["configMapRef"]["name"]]["data"])
    for cm_name, cm in cms.items():
        for key in cm["data"]:
            assert (cm_name, key) in used, f"ConfigMap {cm_name} key {key} is used by no container"
    all_env = set().union(*(env_names(c) for c in settings_classes().values()))
    for cm in cms.values():
        for key in cm["data"]:
            assert key in all_env, f"ConfigMap key {key} is not a setting of any service ({sorted(all_env)})"


def check_edge_models(settings: Any, where: str) -> None:
    """Every model entry of an edge worker's settings is a zoo/import spec or a trained artifact
    under artifacts/ (copied into the image), and the served model names are distinct."""
    from dapdee.models import MANIFEST, WEIGHTS, ModelError, parse_spec, read_manifest

    names = []
    for spec, artifact in settings.model_entries():
        if artifact is None:
            names.append(parse_spec(spec).default_name)
            continue
        rel = Path(artifact)
        assert not rel.is_absolute() and ".." not in rel.parts and rel.parts[0] == "artifacts", (
            f"{where}: artifact {artifact} is not under artifacts/ (the image copies only that)"
        )
        try:
            manifest = read_manifest(ROOT / rel)
        except ModelError as exc:
            pytest.fail(f"{where}: {exc} -- train it (`dapdee train ... --out {artifact}`) or drop it")
        assert (ROOT / rel / WEIGHTS).is_file(), f"{where}: {artifact} has a {MANIFEST} but no {WEIGHTS}"
        trained = parse_spec(manifest["model"])
        if spec:
            given = parse_spec(spec)
            assert (given.kind, given.target) == (trained.kind, trained.target), (
                f"{where}: {spec} names another model than {artifact} ({manifest['model']})"
            )
        names.append(manifest.get("name") or trained.default_name)
    assert len(names) == len(set(names)), f"{where}: two models share a name: {names}"


def edge_settings_everywhere(monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> list[tuple[str, Any]]:
    """(where, settings) of every edge worker that compose and k8s would start."""
    out = []
    for name, s in compose(stack_env)["services"].items():
        if "build" in s:
            served = Served(list(s["command"]), service_env(s), monkeypatch)
            if served.service == "edge":
                out.append((f"compose {name}", served.settings))
    res = k8s_resources()
    cms = by_kind(res, "ConfigMap")
    for name, d in workloads(res).items():
        c = dapdee_container(d)
        if c is not None:
            env = k8s_container_env(c, cms, {TOKEN_SECRET: stack_env})
            served = Served(list(c["args"]), env, monkeypatch)
            if served.service == "edge":
                out.append((f"k8s {name}", served.settings))
    return out


def test_served_models_ship_with_the_image(monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> None:
    """Every model the deployed workers serve is a trained artifact under artifacts/ (copied into
    the image) whose manifest names a model spec the zoo can build."""
    from dapdee.edge_worker.app import load_models

    entries = edge_settings_everywhere(monkeypatch, stack_env)
    assert entries
    loaded: set[str] = set()
    for where, settings in entries:
        check_edge_models(settings, where)
        if settings.models not in loaded:  # the worker's own loader: weights, sha256, tracing
            models = load_models(settings)
            assert len(models) == len(settings.model_entries()), where
            loaded.add(settings.models)


def test_k8s_containers_run_real_commands_with_real_settings(
    monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]
) -> None:
    res = k8s_resources()
    cms = by_kind(res, "ConfigMap")
    seen = set()
    redis_urls = []
    for name, d in workloads(res).items():
        c = dapdee_container(d)
        if c is None:
            continue
        assert "command" not in c, f"{name}: keep the image's ENTRYPOINT (dapdee serve)"
        fields = {"metadata.name": f"{name}-0", "metadata.namespace": d["metadata"]["namespace"]}
        env = k8s_container_env(c, cms, {TOKEN_SECRET: stack_env}, fields)
        served = Served([k8s_expand(a, env) for a in c["args"]], env, monkeypatch)
        service, port, settings = served.service, served.port, served.settings
        seen.add(service)
        assert any(p["containerPort"] == port for p in c["ports"]), f"{name}: serves on {port}, not a containerPort"
        assert served.host == "0.0.0.0", f"{name}: must bind 0.0.0.0 to be reachable"
        names = env_names(settings_classes()[service])
        for e in c.get("env", []):
            if e["name"].startswith("DAPDEE_"):
                assert e["name"] in names, f"{name}: env {e['name']} is not a {service} setting ({sorted(names)})"
        if service == "planner":
            redis_urls.append(settings.redis_url)
        if service == "edge":
            threads = getattr(settings, "threads", None)
            if threads is not None:
                cpu = str(c["resources"]["limits"]["cpu"])
                limit = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
                assert threads <= max(1, limit), f"{name}: {threads} torch threads > CPU limit {cpu}"
            assert settings.planner_url and settings.public_url, f"{name}: must register with the planner"
            public = urllib.parse.urlsplit(settings.public_url)
            assert public.port == port, f"{name}: advertises {settings.public_url}, serves on {port}"
        # probes hit routes the app serves, on the port it listens on
        named = {p["name"]: p["containerPort"] for p in c["ports"] if "name" in p}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe not in c:
                continue
            hg = c[probe].get("httpGet")
            assert hg is not None, f"{name}: {probe} should use the app's HTTP health endpoint"
            pport = named.get(hg["port"], hg["port"])
            assert pport == port, f"{name}: {probe} on port {hg['port']} but the app listens on {port}"
            assert_get_route(service, hg["path"], f"k8s {name} {probe}")
        ann = d["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            assert int(ann["prometheus.io/port"]) == port
            assert_get_route(service, ann.get("prometheus.io/path", "/metrics"), f"k8s {name} scrape annotation")
    assert seen == DAPDEE_SERVICES
    # the edge workers find the planner and Redis through the Services
    services = by_kind(res, "Service")
    planner_url = urllib.parse.urlsplit(cms["dapdee-config"]["data"]["DAPDEE_EDGE_PLANNER_URL"])
    assert planner_url.hostname in services and planner_url.port in [
        p["port"] for p in services["planner"]["spec"]["ports"]
    ]
    assert redis_urls
    for url in redis_urls:
        redis_url = urllib.parse.urlsplit(url)
        assert redis_url.hostname == "redis" and redis_url.port in [
            p["port"] for p in services["redis"]["spec"]["ports"]
        ]


# ---- docker-compose -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        buf = (buf + " " + s) if buf else s
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_json(instr: str) -> list[str]:
    vals = [rest for i, rest in dockerfile_instructions() if i == instr]
    assert vals, f"Dockerfile has no {instr}"
    return json.loads(vals[-1])


def compose_port(name: str, monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> int:
    """The port compose service `name` (one of ours) listens on inside its container."""
    s = compose(stack_env)["services"][name]
    return Served(list(s["command"]), service_env(s), monkeypatch).port


COMPOSE_TOP = {"name", "services", "volumes", "networks", "configs", "secrets"}
COMPOSE_SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports", "expose", "volumes",
    "depends_on", "healthcheck", "restart", "deploy", "stop_grace_period", "labels", "networks", "user",
    "working_dir", "container_name", "ulimits", "logging", "profiles", "init", "read_only", "tmpfs",
    "cap_drop", "cap_add", "security_opt", "mem_limit", "cpus", "stop_signal", "hostname",
}  # fmt: skip
COMPOSE_HEALTHCHECK_KEYS = {
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
    "disable",
}


def test_compose_file_structure() -> None:
    """The keys compose knows (a typo such as `healtcheck` would be ignored silently by some tools)."""
    c = compose_raw()
    assert {k for k in c if not k.startswith("x-")} <= COMPOSE_TOP
    declared = set(c.get("volumes") or {})
    for name, s in c["services"].items():
        assert set(s) <= COMPOSE_SERVICE_KEYS, f"{name}: unknown keys {sorted(set(s) - COMPOSE_SERVICE_KEYS)}"
        assert "image" in s or "build" in s, f"{name}: no image"
        assert set(s.get("healthcheck", {})) <= COMPOSE_HEALTHCHECK_KEYS, f"{name}: healthcheck keys"
        for v in s.get("volumes", []):
            src = str(v).split(":")[0]
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name}: mounts {src}, which does not exist"
            else:
                assert src in declared, f"{name}: named volume {src} is not declared"
        for _ip, host, container in published_ports(s):
            assert host.isdigit() and container.isdigit(), f"{name}: port {host}:{container}"
    host_ports = [(ip, host) for s in c["services"].values() for ip, host, _ in published_ports(s)]
    assert len(host_ports) == len(set(host_ports)), f"host ports used twice: {host_ports}"


def test_planner_grace_period_covers_its_shutdown() -> None:
    """A stopped planner waits for requests in progress, then replays writes queued while Redis
    was away and closes Redis; compose's 10 s grace (equal to the first step alone) killed it
    before the replay, losing those writes. Both deployments now give it the sum."""
    from dapdee.planner.cli import GRACEFUL_SHUTDOWN_S
    from dapdee.planner.redis_link import REDIS_CLOSE_S
    from dapdee.planner.store import CLOSE_DRAIN_S

    need = GRACEFUL_SHUTDOWN_S + CLOSE_DRAIN_S + REDIS_CLOSE_S
    compose = compose_raw()["services"]["planner"]["stop_grace_period"]
    assert compose.endswith("s") and float(compose[:-1]) >= need, (compose, need)
    pod = workloads(k8s_resources())["planner"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= need, (pod["terminationGracePeriodSeconds"], need)


def test_compose_services_and_healthchecks(monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> None:
    c = compose(stack_env)
    svcs = c["services"]
    assert {"redis", "planner", "prometheus", "grafana"} <= set(svcs)
    entrypoint = dockerfile_json("ENTRYPOINT")
    edges = []
    for name, s in svcs.items():
        assert "healthcheck" in s and s["healthcheck"]["test"], f"compose service {name} has no healthcheck"
        for dep, cond in (s.get("depends_on") or {}).items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in svcs[dep]
        if "build" not in s:
            continue
        assert (ROOT / s["build"].get("context", ".") / s["build"].get("dockerfile", "Dockerfile")).is_file()
        assert "entrypoint" not in s, f"{name}: keep the image's ENTRYPOINT {entrypoint}"
        served = Served(list(s["command"]), service_env(s), monkeypatch)
        service, port, settings = served.service, served.port, served.settings
        assert served.host == "0.0.0.0", f"{name}: must bind 0.0.0.0"
        # container ports published map to the port the app listens on
        for _ip, host, container in published_ports(s):
            assert int(container) == port, f"{name}: publishes {host}:{container}, app listens on {port}"
        # healthcheck: the python urllib one-liner hits a real endpoint on the app's port
        test = " ".join(s["healthcheck"]["test"])
        urls = re.findall(r"https?://[^'\" ]+", test)
        assert urls, f"{name}: healthcheck names no URL"
        for u in urls:
            parts = urllib.parse.urlsplit(u)
            assert parts.port == port, f"{name}: healthcheck on port {parts.port}, app on {port}"
            assert_get_route(service, parts.path, f"compose {name} healthcheck")
        if service == "planner":
            assert svcs[name]["depends_on"]["redis"]["condition"] == "service_healthy"
            ru = urllib.parse.urlsplit(settings.redis_url)
            assert ru.hostname == "redis" and ru.port == 6379
        else:
            edges.append(name)
            pu = urllib.parse.urlsplit(settings.public_url or "")
            assert pu.hostname == name and pu.port == port, f"{name}: advertises {settings.public_url}"
            pl = urllib.parse.urlsplit(settings.planner_url or "")
            assert pl.hostname in svcs and "planner" in svcs[pl.hostname]["command"], (
                f"{name}: registers with {settings.planner_url}, not the planner service"
            )
            assert pl.port == compose_port(pl.hostname, monkeypatch, stack_env)
    assert len(edges) >= 2 or any(svcs[e].get("deploy", {}).get("replicas", 1) >= 2 for e in edges)


def test_dockerfile(monkeypatch: pytest.MonkeyPatch) -> None:
    instrs = dockerfile_instructions()
    assert dockerfile_json("ENTRYPOINT") == ["dapdee", "serve"]
    served = Served(dockerfile_json("CMD"), {}, monkeypatch)
    assert served.service in DAPDEE_SERVICES
    exposed = {int(rest.split("/")[0]) for i, rest in instrs if i == "EXPOSE"}
    assert served.port in exposed and served.host == "0.0.0.0"
    users = [rest for i, rest in instrs if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime image must not run as root"
    args = " ".join(rest for i, rest in instrs if i == "ARG")
    assert "download.pytorch.org/whl/cpu" in args, "CPU-only torch index must be a build arg"
    ignored = {
        ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    copied = set()
    for i, rest in instrs:
        if i != "COPY" or "--from=" in rest:
            continue
        srcs = [w for w in rest.split()[:-1] if not w.startswith("--")]
        for src in srcs:
            top = src.split("/")[0]
            copied.add(top)
            assert top not in ignored, f"Dockerfile copies {src}, which .dockerignore excludes"
            if top != "README.md":  # written by the lead; checked below when present
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    import tomllib

    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"dapdee", *(d.split("/")[0] for d in setuptools_cfg["package-dir"].values())}
    for top in folders:
        assert top in copied, f"the image lacks folder {top} that pyproject installs packages from"
    assert "artifacts" in copied
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert readme in copied, "pyproject's readme must be in the build context"


# ---- Prometheus and Grafana -----------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; `make test` does it)")
    r = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_every_dapdee_service(monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> None:
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    svcs = compose(stack_env)["services"]
    targets = {t for job in cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for name, s in svcs.items():
        if "build" not in s:
            continue
        port = compose_port(name, monkeypatch, stack_env)
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}:{port}"
        path = next(
            j.get("metrics_path", "/metrics")
            for j in cfg["scrape_configs"]
            for sc in j.get("static_configs", [])
            if f"{name}:{port}" in sc["targets"]
        )
        assert_get_route(parse_serve(list(s["command"])).service, path, f"prometheus job for {name}")
    mounts = [v for v in svcs["prometheus"]["volumes"] if isinstance(v, str)]
    assert any(v.split(":")[0] == "./deploy/prometheus/prometheus.yml" for v in mounts)


def test_grafana_provisioning_is_consistent() -> None:
    svcs = compose_raw()["services"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in svcs["grafana"]["volumes"] if v.startswith("./")}
    for src in mounts:
        assert (ROOT / src).exists(), f"grafana mounts {src}, which does not exist"
    (ds_file,) = (GRAFANA / "provisioning" / "datasources").glob("*.yml")
    ds = yaml.safe_load(ds_file.read_text())["datasources"]
    prom = [d for d in ds if d["type"] == "prometheus"]
    assert len(prom) == 1
    url = urllib.parse.urlsplit(prom[0]["url"])
    assert url.hostname == "prometheus" and "prometheus" in svcs
    assert any(str(p).split(":")[-1] == str(url.port) for p in svcs["prometheus"]["ports"])
    (prov_file,) = (GRAFANA / "provisioning" / "dashboards").glob("*.yml")
    providers = yaml.safe_load(prov_file.read_text())["providers"]
    dash_dir = mounts["./deploy/grafana/dashboards"]
    assert any(p["options"]["path"] == dash_dir for p in providers), "dashboard provider path is not the mount"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] == "row":  # a row only groups panels (tests/test_dashboard.py checks rows)
            continue
        assert p["datasource"]["uid"] == prom[0]["uid"], f"panel {p['title']}: unknown datasource"
        assert p["targets"] and all(t.get("expr") for t in p["targets"]), f"panel {p['title']}: no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == prom[0]["uid"]
    home = svcs["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home == f"{dash_dir}/{DASHBOARD.name}"


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, PromQL, legend format) of every dashboard query."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dash["panels"] for t in p.get("targets", [])]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query."""
    return [(title, expr) for title, expr, _ in dashboard_targets()]


def test_dashboard_covers_the_required_views() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needed in (
        "dapdee_planner_plans_total",
        "dapdee_planner_plan_duration_seconds_bucket",
        "dapdee_edge_requests_total",
        "dapdee_edge_request_duration_seconds_bucket",
        "dapdee_edge_queue_duration_seconds_bucket",
        "dapdee_edge_batch_size",
        "dapdee_edge_received_bytes_total",
        "dapdee_edge_inflight_requests",
        "dapdee_planner_workers",
    ):
        assert needed in exprs, f"the dashboard has no panel on {needed}"
    assert re.search(r"by \(mode\)[^;]*dapdee_planner_plans_total", exprs), "plans/s by mode"
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


# ---- live: a planner, an edge worker and a Prometheus server on 127.0.0.1 --------------------


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Proc:
    """A child process in its own process group with its output in a file; killed on close."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self._f = open(log, "wb")
        self.p = subprocess.Popen(
            argv, stdout=self._f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )

    def tail(self, n: int = 3000) -> str:
        self._f.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def wait_http(self, url: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.p.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if http("GET", url, timeout=2)[0] == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"{self.name} not ready at {url} in time:\n{self.tail()}")

    def close(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self._f.close()


def redis_available() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
        return True
    return False


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A planner, an edge worker registered with it (both through `dapdee serve`) and a Prometheus
    server scraping them every second with the shipped config's jobs; everything killed after."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; `make test` does it)")
    tmp = tmp_path_factory.mktemp("deploy-live")
    prefix = f"test-deploy-{uuid.uuid4().hex[:8]}"
    redis_url = "redis://127.0.0.1:6379/15" if redis_available() else "none"
    pp, ep, mp = free_port(), free_port(), free_port()
    planner_url, edge_url, prom_url = (f"http://127.0.0.1:{p}" for p in (pp, ep, mp))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    env.update({"DAPDEE_KEY_PREFIX": prefix, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    edge_fields = settings_classes()["edge"].model_fields
    edge_env = dict(env)
    # a fast start-up profile: the test is about plumbing, not timings
    for field, value in (("profile_repeats", "2"), ("profile_warmup", "0"), ("heartbeat_s", "1")):
        if field in edge_fields:
            edge_env[f"DAPDEE_EDGE_{field.upper()}"] = value
    cli = [sys.executable, "-m", "dapdee.cli", "serve"]
    procs: list[Proc] = []
    try:
        deadline = time.monotonic() + BOUNDED_S
        planner = Proc(
            "planner",
            [*cli, "planner", "--host", "127.0.0.1", "--port", str(pp), "--redis-url", redis_url],
            tmp / "planner.log",
            env,
        )
        procs.append(planner)
        planner.wait_http(f"{planner_url}/healthz", deadline)
        edge = Proc(
            "edge",
            [
                *cli,
                "edge",
                "--models",
                EDGE_TEST_SPEC,
                "--tier",
                "edge",
                "--planner",
                planner_url,
                "--public-url",
                edge_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(ep),
            ],
            tmp / "edge.log",
            edge_env,
        )
        procs.append(edge)
        # the shipped Prometheus config, its jobs pointed at the live processes
        cfg = yaml.safe_load(PROM_CONFIG.read_text())
        cfg["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
        where = {"planner": f"127.0.0.1:{pp}", "edge": f"127.0.0.1:{ep}", "prometheus": f"127.0.0.1:{mp}"}
        jobs = []
        for job in cfg["scrape_configs"]:
            for sc in job.get("static_configs", []):
                svc = compose_raw()["services"]
                kinds = set()
                for t in sc["targets"]:
                    host = t.split(":")[0]
                    if host in svc and "build" in svc[host]:
                        kinds.add(parse_serve(list(svc[host]["command"])).service)
                    else:
                        kinds.add("prometheus")
                assert len(kinds) == 1, f"job {job['job_name']} mixes {kinds}"
                sc["targets"] = [where[kinds.pop()]]
            jobs.append(job)
        cfg["scrape_configs"] = jobs
        cfg_path = tmp / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        prom = Proc(
            "prometheus",
            [
                prometheus,
                f"--config.file={cfg_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{mp}",
                "--log.level=warn",
            ],
            tmp / "prometheus.log",
            env,
        )
        procs.append(prom)
        edge.wait_http(f"{edge_url}/v2/health/ready", deadline)
        prom.wait_http(f"{prom_url}/-/ready", deadline)
        yield {
            "planner": planner_url,
            "edge": edge_url,
            "prometheus": prom_url,
            "procs": procs,
            "deadline": deadline,
        }
    finally:
        for p in reversed(procs):
            p.close()
        if redis_url != "none":
            with contextlib.suppress(Exception):
                import redis

                r = redis.Redis.from_url(redis_url)
                keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
                if keys:
                    r.delete(*keys)
                r.close()


def send_infers(edge_url: str, n: int) -> str:
    """POST n JSON v2 infer requests (graph input, default exit) to the worker's one model; its name."""
    from dapdee.models import parse_spec

    status, body = http("GET", f"{edge_url}/v2/models/{parse_spec(EDGE_TEST_SPEC).default_name}")
    assert status == 200, body
    meta = json.loads(body)
    inp = meta["inputs"][0]
    shape = [1, *inp["shape"][1:]]
    count = 1
    for s in shape:
        count *= s
    for i in range(n):
        req = {
            "id": f"r{i}",
            "inputs": [
                {
                    "name": inp["name"],
                    "shape": shape,
                    "datatype": "FP32",
                    "data": [((j * 7 + i) % 11) / 11.0 for j in range(count)],
                }
            ],
        }
        if i % 2:
            req["parameters"] = {"exit": meta["parameters"]["exits"][0]}
        status, body = http("POST", f"{edge_url}/v2/models/{meta['name']}/infer", req, timeout=30)
        assert status == 200, body[:500]
    return meta["name"]


def prom_query(prom_url: str, q: str) -> dict[str, Any]:
    status, body = http("GET", f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": q}))
    out = json.loads(body)
    assert status == 200 and out["status"] == "success", f"query {q!r}: {status} {body[:300]!r}"
    return out["data"]


def poll_value(prom_url: str, q: str, ok: Any, deadline: float) -> float:
    last: Any = None
    while time.monotonic() < deadline:
        res = prom_query(prom_url, q)["result"]
        if res:
            last = float(res[0]["value"][1])
            if ok(last):
                return last
        time.sleep(0.5)
    pytest.fail(f"Prometheus query {q!r}: last value {last}, condition never met")


def exported_series(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names a /metrics text can give Prometheus (histograms as _bucket/_count/_sum,
    counters as _total, from # TYPE lines too) and the label names seen per series name."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "summary": ["_count", "_sum", "_created", ""],
        "gauge": [""],
        "info": ["_info"],
        "gaugehistogram": ["_bucket", "_gcount", "_gsum"],
        "stateset": [""],
        "unknown": [""],
    }
    for fam in text_string_to_metric_families(text):
        for suf in suffixes.get(fam.type, [""]):
            names.add(fam.name + suf)
        for s in fam.samples:
            names.add(s.name)
            labels.setdefault(s.name, set()).update(s.labels)
    return names, labels


def test_dashboard_queries_name_only_exported_metrics(live: dict[str, Any]) -> None:
    send_infers(live["edge"], 2)
    # the per-worker fleet gauges appear at the planner's first refresh after the worker registered
    deadline = time.monotonic() + 15
    while b"dapdee_planner_worker_capacity_ms_per_second{" not in http("GET", f"{live['planner']}/metrics")[1]:
        assert time.monotonic() < deadline, "the planner never exported its per-worker gauges"
        time.sleep(0.2)
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for svc in ("planner", "edge"):
        status, body = http("GET", f"{live[svc]}/metrics")
        assert status == 200
        n, lab = exported_series(body.decode())
        names |= n
        for k, v in lab.items():
            labels.setdefault(k, set()).update(v)
    for title, expr, legend in dashboard_targets():
        used = set(re.findall(r"\bdapdee_[A-Za-z0-9_]+", expr))
        assert used, f"panel {title!r}: no dapdee metric in {expr}"
        # the device runtime's metrics are not served here (tests/test_dashboard.py checks them)
        used = {m for m in used if not m.startswith("dapdee_device_")}
        if not used:
            continue
        for m in used:
            assert m in names, f"panel {title!r}: {m} is not exported (exported: {sorted(names)})"
        have = {"instance", "job", "service"}.union(*(labels.get(m, set()) for m in used))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for lab in (x.strip() for x in group.split(",") if x.strip()):
                assert lab in have, f"panel {title!r}: label {lab!r} is not on {sorted(used)}"
        for lab in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert lab in have, f"panel {title!r}: legend uses label {lab!r}, not on {sorted(used)}"


def test_compose_healthchecks_pass_against_live_services(
    live: dict[str, Any], monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]
) -> None:
    """The compose healthcheck one-liners of our services, run as written (URL pointed at the
    live process), exit 0."""
    svcs = compose(stack_env)["services"]
    for name, s in svcs.items():
        if "build" not in s:
            continue
        served = Served(list(s["command"]), service_env(s), monkeypatch)
        test = list(s["healthcheck"]["test"])
        assert test[0] == "CMD" and test[1] in ("python", "python3"), f"{name}: {test}"
        live_url = live[served.service]
        argv = [sys.executable, *(a.replace(f"http://127.0.0.1:{served.port}", live_url) for a in test[2:])]
        assert argv != [sys.executable, *test[2:]], f"{name}: healthcheck does not target 127.0.0.1:{served.port}"
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{name}: healthcheck failed: {r.stderr[-500:]}"


def test_prometheus_scrapes_live_services(live: dict[str, Any]) -> None:
    prom = live["prometheus"]
    deadline = time.monotonic() + 45
    model = send_infers(live["edge"], 4)
    for job in ("planner", "edge"):
        poll_value(prom, f'up{{job="{job}"}}', lambda v: v == 1.0, deadline)
    total = poll_value(prom, "sum(dapdee_edge_requests_total)", lambda v: v >= 4, deadline)
    assert total >= 4
    res = prom_query(prom, 'dapdee_edge_requests_total{status="200"}')["result"]
    assert {r["metric"]["model"] for r in res} == {model}
    # the worker registered with the planner: the planner counts it
    poll_value(prom, "max(dapdee_planner_workers)", lambda v: v >= 1, deadline)
    # every dashboard query is valid PromQL for a real Prometheus (Grafana's variables filled in)
    for _title, expr in dashboard_exprs():
        q = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
        prom_query(prom, q)  # fails the test, naming the query, unless Prometheus accepts it
    # the compose healthcheck of the Prometheus container hits an endpoint Prometheus serves
    test = " ".join(compose_raw()["services"]["prometheus"]["healthcheck"]["test"])
    for url in re.findall(r"https?://[^'\" ]+", test):
        status, _ = http("GET", prom + urllib.parse.urlsplit(url).path)
        assert status == 200, f"prometheus healthcheck {url}: {status}"
