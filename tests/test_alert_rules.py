"""The Prometheus alerting rules (deploy/prometheus/rules.yml): valid for `promtool check rules`,
their unit tests (rules.test.yml) pass under `promtool test rules` with a firing and a quiet case
per alert, each alert is complete (for, severity, summary, description), reads only known metrics
and labels, and Prometheus loads the file through the shipped config. promtool comes from
Debian's `prometheus` package (`make test` installs it); without it these tests fail."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.deploy_files import compose_raw
from tests.observability import (
    allowed_labels,
    known_metrics,
    labels_used,
    legend_labels,
    metric_names,
    promtool,
    series_names,
)

PROM_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULE_TESTS = PROM_DIR / "rules.test.yml"
REQUIRED = {  # alert -> the metric its expression must read
    "DapdeeEdgeLeasedSaturation": "dapdee_planner_worker_leased_ms_per_second",
    "DapdeeEdgeMeasuredSaturation": "dapdee_edge_compute_busy_seconds_total",
    "DapdeeFallbackRateHigh": "dapdee_device_frames_total",
    "DapdeePlanErrorRateHigh": "dapdee_planner_plans_total",
    "DapdeeRedisDown": "dapdee_planner_redis_up",
    "DapdeePredictionErrorHigh": "dapdee_device_prediction_error_ratio_bucket",
}
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
    constraints_unmet as an error, the Redis alert waiting 5 minutes instead of 1)."""
    for old, new in (('outcome!~"ok|constraints_unmet"', 'outcome!="ok"'), ("for: 1m", "for: 5m")):
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
        assert rules[name]["for"] == "5m" and "> 0.9" in rules[name]["expr"]


def test_alerts_read_known_metrics_and_labels() -> None:
    metrics = known_metrics()
    series = series_names(metrics)
    for name, rule in alerts().items():
        expr = rule["expr"]
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
    """rule_files is relative to the config file: the container must have rules.yml beside it."""
    prom = compose_raw()["services"]["prometheus"]
    config = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if isinstance(v, str) and v.startswith("./"))
    assert mounts.get("./deploy/prometheus/prometheus.yml") == config
    assert mounts.get("./deploy/prometheus/rules.yml") == str(PurePosixPath(config).parent / RULES.name)
