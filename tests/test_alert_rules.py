"""The Prometheus alerting rules (deploy/prometheus/rules.yml): valid for `promtool check rules`,
their unit tests (rules.test.yml) pass under `promtool test rules` with a firing and a quiet case
per alert, each alert is complete (for, severity, summary, description), reads only known metrics
and labels, its threshold is one the services can reach, and Prometheus loads the file through
the shipped config, which scrapes every service whose metrics an alert or a dashboard panel
reads (the device runtimes through file-based discovery, devices/*.json). promtool comes from
Debian's `prometheus` package (`make test` installs it); without it these tests fail."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from dapdee.testing import end_process
from tests.deploy_files import compose_raw
from tests.observability import (
    allowed_labels,
    exported_by_service,
    known_metrics,
    labels_used,
    legend_labels,
    metric_names,
    promtool,
    series_names,
)
from tests.test_dashboard import targets as dashboard_queries

PROM_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULE_TESTS = PROM_DIR / "rules.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DEVICE_EXAMPLE = PROM_DIR / "devices" / "devices.json.example"  # not matched by devices/*.json
REQUIRED = {  # alert -> the metric its expression must read
    "DapdeeEdgeLeasedSaturation": "dapdee_planner_worker_leased_ms_per_second",
    "DapdeeEdgeMeasuredSaturation": "dapdee_edge_compute_busy_seconds_total",
    "DapdeeFallbackRateHigh": "dapdee_device_frames_total",
    "DapdeePlanErrorRateHigh": "dapdee_planner_plans_total",
    "DapdeeRedisDown": "dapdee_planner_redis_up",
    "DapdeePredictionErrorHigh": "dapdee_device_prediction_error_ratio_bucket",
    "DapdeeTargetDown": "up{",
}
SCRAPE_HEALTH = {"DapdeeTargetDown"}  # read Prometheus's own `up`, not a dapdee metric
SEVERITIES = {"page", "ticket"}


def alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    out: dict[str, dict[str, Any]] = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in out, f"alert {rule['alert']} defined twice"
                out[rule["alert"]] = rule
    return out


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=PROM_DIR)


def test_promtool_check_rules() -> None:
    r = run("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    r = run("test", "rules", RULE_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_test_rules_catches_a_broken_rule(tmp_path: Path) -> None:
    """Negative control: the unit tests fail when a rule changes (the plan error rate counting
    constraints_unmet as an error, no longer counting the request guard's refusals or counting
    them on every route, the Redis alert waiting 5 minutes instead of 1, the leased saturation
    back at `> 0.9`, which admission never lets a worker reach, or strictly over 85%)."""
    for old, new in (
        ('outcome!~"ok|constraints_unmet"', 'outcome!="ok"'),
        ('+ sum by (job) (rate(dapdee_planner_rejected_total{route="/plan"}[5m]))', ""),
        ('dapdee_planner_rejected_total{route="/plan"}', "dapdee_planner_rejected_total"),
        ("for: 1m", "for: 5m"),
        (">= 0.85", "> 0.9"),
        (">= 0.85", "> 0.85"),
    ):
        text = RULES.read_text()
        assert old in text
        (tmp_path / "rules.yml").write_text(text.replace(old, new))
        (tmp_path / "rules.test.yml").write_text(RULE_TESTS.read_text())
        r = subprocess.run(
            [promtool(), "test", "rules", "rules.test.yml"], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert r.returncode != 0, f"the unit tests did not notice {old!r} -> {new!r}"


def test_the_required_alerts_exist_and_are_complete() -> None:
    rules = alerts()
    assert set(REQUIRED) <= set(rules), f"missing alerts: {sorted(set(REQUIRED) - set(rules))}"
    for name, rule in rules.items():
        assert rule.get("for"), f"{name}: no `for:` (a single bad scrape would page)"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not in {SEVERITIES}"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), f"{name}: summary and description"
        if name in REQUIRED:
            assert REQUIRED[name] in rule["expr"], f"{name}: does not read {REQUIRED[name]}"
    assert rules["DapdeeRedisDown"]["for"] == "1m"
    assert rules["DapdeePredictionErrorHigh"]["for"] == "10m"
    assert "histogram_quantile(0.5," in rules["DapdeePredictionErrorHigh"]["expr"]
    for name in ("DapdeeEdgeLeasedSaturation", "DapdeeEdgeMeasuredSaturation"):
        assert rules[name]["for"] == "5m"
    assert ">= 0.85" in rules["DapdeeEdgeLeasedSaturation"]["expr"]  # see the next test
    assert "> 0.9" in rules["DapdeeEdgeMeasuredSaturation"]["expr"]  # a measured fraction: reaches 1


def _series_values(notation: str) -> list[float]:
    """The values of a promtool input series (`a`, `axN`, `a+bxN`, `a-bxN`, `_`, `stale`). O(values)."""
    out: list[float] = []
    for token in notation.split():
        m = re.fullmatch(r"(-?[0-9.e]+)(?:([+-])([0-9.e]+))?x([0-9]+)", token)
        if m is None:
            if token not in ("_", "stale"):
                out.append(float(token))
            continue
        start, sign, step, n = float(m[1]), m[2], float(m[3] or 0), int(m[4])
        out += [start + (step if sign == "+" else -step) * i for i in range(n + 1)]
    return out


def test_the_leased_saturation_fires_at_what_admission_produces() -> None:
    """Admission books at most rho_max x a worker's capacity (services/planner/leases.py;
    DAPDEE_RHO_MAX, the planner's default), so leased / capacity never exceeds rho_max: the
    alert's threshold must be reachable (at most rho_max) and mean nearly full (within 0.1 of
    it), and its unit tests must feed only ratios admission can produce."""
    from dapdee.planner.config import Settings

    rho_max = Settings.model_fields["rho_max"].default
    expr = alerts()["DapdeeEdgeLeasedSaturation"]["expr"]
    (op, threshold) = re.findall(r"(>=|>)\s*([0-9.]+)\s*$", expr.strip())[0]
    threshold = float(threshold)
    assert threshold < rho_max or (op == ">=" and threshold == rho_max), (
        f"leased / capacity peaks at rho_max = {rho_max}: `{op} {threshold}` can never fire"
    )
    assert threshold >= rho_max - 0.1, f"`{op} {threshold}` fires on a worker far from full (rho_max {rho_max})"
    ratios = []
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        by_key: dict[str, dict[str, list[float]]] = {}
        for s in case["input_series"]:
            m = re.fullmatch(r"dapdee_planner_worker_(leased|capacity)_ms_per_second(\{.*\})", s["series"])
            if m:
                by_key.setdefault(m[2], {})[m[1]] = _series_values(s["values"])
        for key, pair in by_key.items():
            assert set(pair) == {"leased", "capacity"}, (
                f"{case['name']}: {key} has no {set(pair) ^ {'leased', 'capacity'}}"
            )
            ratios += [lease / cap for lease, cap in zip(pair["leased"], pair["capacity"], strict=False)]
    assert ratios, "no unit test of the leased saturation"
    assert max(ratios) <= rho_max + 1e-9, f"a unit test feeds leased / capacity {max(ratios)} > rho_max {rho_max}"
    assert any(r >= threshold for r in ratios) and any(r < threshold for r in ratios)


def test_alerts_read_known_metrics_and_labels() -> None:
    metrics = known_metrics()
    series = series_names(metrics)
    for name, rule in alerts().items():
        expr = rule["expr"]
        if name in SCRAPE_HEALTH:
            continue  # test_the_target_down_alert_watches_the_scraped_services
        used = metric_names(expr)
        assert used, f"{name}: reads no dapdee metric"
        unknown = used - set(series)
        assert not unknown, f"{name}: unknown metrics {sorted(unknown)}"
        allowed = allowed_labels(expr, metrics)
        assert labels_used(expr) <= allowed, f"{name}: labels {sorted(labels_used(expr) - allowed)} are not on {used}"
        # what a template may print: the labels the result keeps (every `by` keeps at most its own)
        groups = [{x.strip() for x in g.split(",") if x.strip()} for g in re.findall(r"\bby\s*\(([^)]*)\)", expr)]
        kept = set.intersection(*groups) if groups else allowed
        for text in rule["annotations"].values():
            assert legend_labels(text) <= kept, f"{name}: annotation uses {sorted(legend_labels(text) - kept)}"


def test_the_target_down_alert_watches_the_scraped_services() -> None:
    """Every other alert reads the planner's and edge workers' series, which go stale when
    Prometheus cannot scrape them: the alerts then go quiet. DapdeeTargetDown pages on `up == 0`
    of the targets whose `service` label is one of those services (the label the shipped
    config's jobs give their targets and the k8s pods carry; job names differ between
    deployments), not the devices, which come and go, and labels the alert with that service."""
    rule = alerts()["DapdeeTargetDown"]
    services = re.fullmatch(r'up\{service=~"([a-z_|]+)"\} == 0', rule["expr"].strip())
    assert services is not None, rule["expr"]
    assert set(services[1].split("|")) == {"planner", "edge"} <= set(scraped_services())
    assert rule["labels"]["service"] == "{{ $labels.service }}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names <= firing, f"alerts never tested firing: {sorted(names - firing)}"
    assert names <= quiet, f"alerts never tested quiet: {sorted(names - quiet)}"


def test_the_shipped_config_loads_the_rules() -> None:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert RULES.name in cfg.get("rule_files", []), f"prometheus.yml does not load {RULES.name}"
    r = run("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout + r.stderr  # it read rules.yml too


def test_compose_mounts_the_rules_next_to_the_config() -> None:
    """rule_files and file_sd files are relative to the config file: the container must have
    rules.yml beside it and the device targets' directory under it."""
    prom = compose_raw()["services"]["prometheus"]
    config = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if isinstance(v, str) and v.startswith("./"))
    assert mounts.get("./deploy/prometheus/prometheus.yml") == config
    assert mounts.get("./deploy/prometheus/rules.yml") == str(PurePosixPath(config).parent / RULES.name)
    root = PROM_DIR.parents[1]
    for pattern in file_sd_patterns():
        assert not PurePosixPath(pattern).is_absolute(), f"{pattern}: relative to the config, as in the repo"
        folder = PurePosixPath(pattern).parent
        src = f"./deploy/prometheus/{folder}"
        assert mounts.get(src) == str(PurePosixPath(config).parent / folder), f"compose does not mount {src}"
        assert (root / src).is_dir(), f"compose mounts {src}, which does not exist"


# ---- what Prometheus scrapes ------------------------------------------------------------------


def scrape_jobs() -> list[dict[str, Any]]:
    return list(yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"])


def file_sd_patterns(job: dict[str, Any] | None = None) -> list[str]:
    """The file_sd globs of `job` (of every job by default)."""
    jobs = [job] if job is not None else scrape_jobs()
    return [f for j in jobs for sd in j.get("file_sd_configs", []) for f in sd["files"]]


def scraped_services() -> dict[str, str]:
    """service -> the job that scrapes it: the `service` label a job gives its targets, from its
    static_configs' labels or a relabel rule that sets it, for a job that has targets at all
    (static ones or a file-based discovery)."""
    out: dict[str, str] = {}
    for job in scrape_jobs():
        services = {sc.get("labels", {}).get("service") for sc in job.get("static_configs", []) if sc.get("targets")}
        for rule in job.get("relabel_configs", []):
            if rule.get("target_label") == "service" and rule.get("action", "replace") == "replace":
                assert not rule.get("source_labels"), f"job {job['job_name']}: `service` must be a constant"
                if job.get("file_sd_configs") or job.get("static_configs"):
                    services = {rule["replacement"]}
        for service in services - {None}:
            assert service not in out, f"{service} is scraped by jobs {out[service]} and {job['job_name']}"
            out[service] = job["job_name"]
    return out


def test_every_metric_read_is_served_by_a_scraped_service() -> None:
    """Each metric an alert or a dashboard panel reads is exported by a service (planner, edge
    worker, device runtime) that a job of the shipped config scrapes: otherwise the alert can
    never fire and the panel stays empty."""
    owner = {name: service for service, metrics in exported_by_service().items() for name in metrics}
    scraped = scraped_services()
    reads = [(f"alert {name}", rule["expr"]) for name, rule in alerts().items()]
    reads += [(f"panel {title!r}", expr) for title, expr, _ in dashboard_queries()]
    series = series_names(known_metrics())
    for who, expr in reads:
        for name in metric_names(expr):
            service = owner[series[name]]
            assert service in scraped, f"{who} reads {name}, served by the {service}, which no job scrapes"
    assert set(scraped) >= {"planner", "edge", "device"}


def test_device_targets_are_discovered_from_files() -> None:
    """The device job reads its targets from devices/*.json next to the config; the shipped
    example is not matched (so a fresh stack has no device target), is listed in the README and
    is a valid file_sd file."""
    (job,) = [j for j in scrape_jobs() if j["job_name"] == scraped_services()["device"]]
    assert file_sd_patterns(job) == ["devices/*.json"]
    assert not job.get("static_configs")
    assert DEVICE_EXAMPLE.is_file() and not DEVICE_EXAMPLE.match("*.json")
    assert not list(PROM_DIR.glob("devices/*.json")), "a shipped file would scrape a device nobody runs"
    groups = json.loads(DEVICE_EXAMPLE.read_text())
    assert groups and all(set(g) <= {"targets", "labels"} and g["targets"] for g in groups)
    assert DEVICE_EXAMPLE.name in (DEVICE_EXAMPLE.parent / "README.md").read_text()


def _copy_config(tmp_path: Path, scrape_interval: str | None = None) -> Path:
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    if scrape_interval:
        cfg["global"].update({"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval})
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "devices").mkdir()
    return tmp_path / "prometheus.yml"


def test_promtool_accepts_the_example_device_targets(tmp_path: Path) -> None:
    """With the example copied to a name the glob matches, promtool reads it as a file_sd file."""
    config = _copy_config(tmp_path)
    shutil.copy(DEVICE_EXAMPLE, tmp_path / "devices" / "site.json")
    r = subprocess.run(
        [promtool(), "check", "config", config.name], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
    (tmp_path / "devices" / "bad.json").write_text('[{"targets": "not-a-list"}]')  # negative control
    r = subprocess.run(
        [promtool(), "check", "config", config.name], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_prometheus_scrapes_a_device_listed_in_a_targets_file(tmp_path: Path) -> None:
    """End to end: a device runtime's metrics server (`serve_metrics`, as `dapdee device run
    --metrics-port` starts it), listed in devices/<name>.json, is scraped by a real Prometheus
    running the shipped config: its job is `device`, its `service` label `device`, and its
    dapdee_device_frames_total arrives."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; `make test` does it)")
    from dapdee.device.metrics import DeviceMetrics, serve_metrics

    device_port, prom_port = _free_port(), _free_port()
    metrics = DeviceMetrics()
    server, _thread = serve_metrics(metrics, device_port, "127.0.0.1")
    config = _copy_config(tmp_path, scrape_interval="1s")
    (tmp_path / "devices" / "lab.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{device_port}"]}]))
    cmd = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    base = f"http://127.0.0.1:{prom_port}/api/v1"
    query = "dapdee_device_frames_total"
    with open(tmp_path / "prometheus.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            with contextlib.suppress(OSError):
                result = _get_json(f"{base}/query?query={query}")["data"]["result"]
        assert result, f"no {query} scraped in 60 s: " + (tmp_path / "prometheus.log").read_text()
        assert {r["metric"]["where"] for r in result} == {"edge", "local", "fallback"}
        for r in result:
            assert r["metric"]["job"] == "device" and r["metric"]["service"] == "device"
            assert r["metric"]["instance"] == f"127.0.0.1:{device_port}"
    finally:
        end_process(proc, wait_s=15)
        server.shutdown()
        server.server_close()
