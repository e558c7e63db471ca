"""The deployment files read as the tools that run them read them, for tests/test_deploy*.py.

- Kubernetes: the objects `kubectl apply -k k8s/` creates (namespace filled in as kustomize does),
  and a container's environment as the kubelet builds it (ConfigMap and Secret references
  resolved, `$(VAR)` expanded).
- docker compose: docker-compose.yml after compose's variable interpolation (`${VAR:?msg}`,
  `${VAR:-default}`, `$$`) from an env file.
- `make secrets`: the env file it writes (run into a temporary directory).
- `dapdee serve`: what a command line and an environment would run, through the real argument
  parser and the services' real Settings classes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DAPDEE_SERVICES = {"planner", "edge"}  # `dapdee serve` sub-commands
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
ROLE_TOKENS = ("DAPDEE_ADMIN_TOKEN", "DAPDEE_DEVICE_TOKEN", "DAPDEE_WORKER_TOKEN")  # CONTRACT names
TOKEN_SECRET = "dapdee-tokens"  # the Kubernetes Secret the manifests need (created by the operator)


# ---- Kubernetes -----------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a file. O(file size)."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kustomization() -> dict[str, Any]:
    return load_yaml_docs(K8S / "kustomization.yaml")[0]


def k8s_resources() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k k8s/` creates (namespace filled in as kustomize does)."""
    kz = kustomization()
    out = []
    for rel in kz["resources"]:
        for doc in load_yaml_docs(K8S / rel):
            doc = copy.deepcopy(doc)
            if doc["kind"] != "Namespace":
                doc.setdefault("metadata", {}).setdefault("namespace", kz.get("namespace", "default"))
            doc["_file"] = rel
            out.append(doc)
    return out


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def workloads(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets by name (the objects that own pod templates)."""
    return {r["metadata"]["name"]: r for r in resources if r["kind"] in WORKLOAD_KINDS}


def strip_private(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def dapdee_container(workload: dict[str, Any]) -> dict[str, Any] | None:
    """The container running our image (args start with a `dapdee serve` sub-command), if any."""
    for c in pod_spec(workload)["containers"]:
        args = c.get("args") or []
        if args and args[0] in DAPDEE_SERVICES:
            return c
    return None


_K8S_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def k8s_expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in env values, command and args: a known variable is
    replaced, an unknown reference is kept as written, `$$` is a literal `$`. O(len(text))."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _K8S_REF.sub(sub, text)


def k8s_container_env(
    c: dict[str, Any],
    cms: dict[str, dict[str, Any]],
    secrets: Mapping[str, Mapping[str, str]] | None = None,
    fields: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then `env` in
    order, with ConfigMap keys, Secret keys (`secrets`: Secret name -> its data) and fieldRefs
    (`fields`: field path -> value) resolved and `$(VAR)` references to earlier variables
    expanded. Variables whose source is not given are left out."""
    env: dict[str, str] = {}
    for ef in c.get("envFrom", []):
        if "configMapRef" in ef:
            env.update(cms[ef["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        vf = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = k8s_expand(e["value"], env)
        elif "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            env[e["name"]] = cms[ref["name"]]["data"][ref["key"]]
        elif "secretKeyRef" in vf and secrets is not None:
            ref = vf["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        elif "fieldRef" in vf and fields is not None:
            env[e["name"]] = fields[vf["fieldRef"]["fieldPath"]]
    return env


# ---- docker compose -------------------------------------------------------------------------


class MissingVariable(Exception):
    """A `${NAME:?message}` reference whose variable is unset or empty (compose refuses to start)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


_COMPOSE_REF = re.compile(r"\$\$|\$\{(?P<braced>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|\$")
_COMPOSE_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def compose_references(text: str) -> list[tuple[str, str | None]]:
    """(variable, operator) of every `${...}` / `$NAME` reference in a compose string. O(len)."""
    out = []
    for m in _COMPOSE_REF.finditer(text):
        if m["bare"]:
            out.append((m["bare"], None))
        elif m["braced"] is not None:
            b = _COMPOSE_BRACED.fullmatch(m["braced"])
            assert b, f"malformed compose interpolation ${{{m['braced']}}}"
            out.append((b["name"], b["op"]))
    return out


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of one string: `$$` -> `$`; `${V}` / `$V`; `${V:-d}` / `${V-d}`
    default; `${V:+a}` / `${V+a}`; `${V:?msg}` / `${V?msg}` raise MissingVariable when unset
    (or, with the colon, empty). A lone `$` is an error, as in compose. O(len(text))."""

    def sub(m: re.Match[str]) -> str:
        token = m.group(0)
        if token == "$$":
            return "$"
        if token == "$":
            raise ValueError(f"invalid interpolation: a lone $ in {text!r} (write $$)")
        if m["bare"]:
            return env.get(m["bare"], "")
        b = _COMPOSE_BRACED.fullmatch(m["braced"])
        if b is None:
            raise ValueError(f"invalid interpolation ${{{m['braced']}}} in {text!r}")
        name, op, arg = b["name"], b["op"], b["arg"]
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op is None:
            return value or ""
        if op.endswith("?"):
            if unset:
                raise MissingVariable(name, arg)
            return value  # type: ignore[return-value]
        if op.endswith("-"):
            return arg if unset else value  # type: ignore[return-value]
        return "" if unset else arg

    return _COMPOSE_REF.sub(sub, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """`interpolate` applied to every string value of a parsed compose file (keys are not
    interpolated, as in compose). O(size)."""
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def compose_raw() -> dict[str, Any]:
    """docker-compose.yml as written (YAML anchors and merge keys resolved, no interpolation)."""
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def compose(env: Mapping[str, str]) -> dict[str, Any]:
    """docker-compose.yml as compose runs it with the variables `env` (an env file's contents)."""
    return interpolate_tree(compose_raw(), env)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's `environment` (mapping or list form) as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(e).partition("=")[::2] for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# ---- `make secrets` -------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """`NAME=value` lines of an env file (comments and blank lines skipped), as compose and
    `kubectl create secret --from-env-file` read them."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path}: not NAME=value: {line!r}"
            out[name.strip()] = value
    return out


def make_secrets(path: Path) -> subprocess.CompletedProcess[str]:
    """Run `make secrets SECRETS_FILE=path` in the repository; its completed process."""
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "secrets", f"SECRETS_FILE={path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- what `dapdee serve` would run ----------------------------------------------------------


def settings_classes() -> dict[str, type]:
    """The services' real Settings classes by `dapdee serve` sub-command."""
    from dapdee.edge_worker.config import Settings as EdgeSettings
    from dapdee.planner.config import Settings as PlannerSettings

    return {"planner": PlannerSettings, "edge": EdgeSettings}


def env_fields(settings_cls: type) -> dict[str, str]:
    """Environment variable name -> field name of a pydantic-settings class (prefix + field, or
    its aliases)."""
    from pydantic import AliasChoices

    prefix = settings_cls.model_config.get("env_prefix", "")
    names: dict[str, str] = {}
    for name, field in settings_cls.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names[(prefix + name).upper()] = name
        elif isinstance(alias, str):
            names[alias.upper()] = name
        elif isinstance(alias, AliasChoices):
            names.update((a.upper(), name) for a in alias.choices if isinstance(a, str))
    return names


def env_names(settings_cls: type) -> set[str]:
    """Environment variable names a pydantic-settings class reads."""
    return set(env_fields(settings_cls))


def plain(value: Any) -> Any:
    """A settings value with a SecretStr unwrapped."""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def instantiate_settings(
    settings_cls: type, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> Any:
    """Build the Settings from exactly `env` (other DAPDEE_* variables removed), as the app would."""
    for k in list(os.environ):
        if k.startswith("DAPDEE_"):
            monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return settings_cls(**overrides)


def parse_serve(argv: list[str]) -> Any:
    """Parse `dapdee serve ARGV...` with the real parser; fail the test with argparse's message."""
    from dapdee.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(["serve", *argv])
    except SystemExit:
        pytest.fail(f"`dapdee serve {shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


class Served:
    """What `dapdee serve ARGV` would run with environment `env`: the service, its settings (the
    environment, then the command-line flags that name settings fields, as the CLIs apply them),
    and the address it binds."""

    def __init__(self, argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.argv = argv
        self.ns = parse_serve(argv)
        self.service: str = self.ns.service
        cls = settings_classes()[self.service]
        self.fields = env_fields(cls)
        for k in env:
            if k.startswith("DAPDEE_"):
                assert k in self.fields, f"env {k} is not a {self.service} setting ({sorted(self.fields)})"
        overrides = {k: v for k, v in vars(self.ns).items() if k in cls.model_fields and v is not None}
        self.settings = instantiate_settings(cls, env, monkeypatch, **overrides)
        self.host = self.ns.host if self.ns.host is not None else self.settings.host
        self.port = int(self.ns.port if self.ns.port is not None else self.settings.port)

    def setting(self, env_name: str) -> Any:
        """The value the service holds for environment variable `env_name` (SecretStr unwrapped)."""
        return plain(getattr(self.settings, self.fields[env_name]))


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host IP, host port, container port) of every port a compose service publishes, short
    (`[IP:][HOST:]CONTAINER[/proto]`, IPv6 IP in brackets) or long syntax. An empty host IP
    means all interfaces, an empty host port a random one."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((str(p.get("host_ip", "")), str(p.get("published", "")), str(p["target"])))
            continue
        spec = str(p).split("/")[0]
        ip = ""
        if spec.startswith("["):
            ip, _, spec = spec[1:].partition("]:")
        parts = spec.split(":")
        if len(parts) == 3 and not ip:
            ip = parts.pop(0)
        assert 1 <= len(parts) <= 2, f"port {p!r}: not [IP:][HOST:]CONTAINER"
        out.append((ip, parts[0] if len(parts) == 2 else "", parts[-1]))
    return out


def generated_secrets(directory: Path) -> dict[str, str]:
    """The env file `make secrets` writes into `directory`, parsed (fails the test if make fails)."""
    path = directory / "stack.env"
    r = make_secrets(path)
    assert r.returncode == 0, r.stdout + r.stderr
    return read_env_file(path)
