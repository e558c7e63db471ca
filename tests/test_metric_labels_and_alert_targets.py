"""Metric labels and alert targets, against real components: an infer to a served model at a
version it does not serve is counted under the model's name (a real edge worker on 127.0.0.1,
read back through a real /metrics scrape), and the target-down alert selects the planner and the
edge workers by the `service` target label that both shipped deployments give them (compose's
scrape config, and the Kubernetes pods' `service` label that pod discovery maps onto it), not by
compose's scrape job names."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from torch import nn

from dapdee import wire
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.metrics import UNKNOWN
from dapdee.models import LoadedModel, load_model
from dapdee.testing import serve_app_in_thread
from tests import metrics_scrape
from tests.deploy_files import dapdee_container, k8s_resources, pod_labels, workloads
from tests.observability import promtool

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
BAD_VERSIONS = ("2", "7", "v1", "x" * 300, "1.0")  # every version but "1" is 404


def tiny() -> nn.Module:
    """Linear(8, 4): the smallest model an edge worker serves."""
    return nn.Linear(8, 4)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model("tests.test_metric_labels_and_alert_targets:tiny", input_shape=(1, 8))


@pytest.fixture(scope="module")
def edge(model: LoadedModel) -> Iterator[httpx.Client]:
    """A real edge worker serving `model`, open (no tokens) on 127.0.0.1."""
    with serve_app_in_thread(create_app(Settings(models=""), [model])) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def _scrape(client: httpx.Client) -> metrics_scrape.Samples:
    """The worker's /metrics, parsed."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return metrics_scrape.parse(r.text)


def _value_or_zero(samples: metrics_scrape.Samples, name: str, **labels: str) -> float:
    """The one sample `name` with `labels`, or 0 when there is none."""
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items())]
    assert len(found) <= 1, f"{name}{labels}: {found}"
    return found[0] if found else 0.0


def test_a_bad_version_of_a_served_model_is_counted_under_the_model(edge: httpx.Client, model: LoadedModel) -> None:
    """Each infer at a version the model does not have is 404 and counted under the model's name
    (exit `_unknown`, status 404) in the requests counter, the request duration histogram and
    the received bytes, like the model's other 4xx; not under `_unknown`, and not as a guard
    refusal. The version string never becomes a label value. A model the worker does not serve
    is still counted under `_unknown` only, and version 1 is served and counted as before."""
    body, headers = wire.encode_request({model.input_name: torch.randn(1, 8)})
    before = _scrape(edge)
    for version in BAD_VERSIONS:
        r = edge.post(f"/v2/models/{model.name}/versions/{version}/infer", content=body, headers=headers)
        assert r.status_code == 404 and "version" in r.json()["error"], r.text
    assert edge.post(f"/v2/models/{model.name}x/versions/1/infer", content=body, headers=headers).status_code == 404
    assert edge.post(f"/v2/models/{model.name}/versions/1/infer", content=body, headers=headers).status_code == 200
    after = _scrape(edge)

    def moved(name: str, **labels: str) -> float:
        return _value_or_zero(after, name, **labels) - _value_or_zero(before, name, **labels)

    n = len(BAD_VERSIONS)
    assert moved("dapdee_edge_requests_total", model=model.name, exit=UNKNOWN, status="404") == n
    assert moved("dapdee_edge_requests_total", model=UNKNOWN, exit=UNKNOWN, status="404") == 1  # the unserved one
    assert moved("dapdee_edge_requests_total", model=model.name, status="200") == 1  # version 1 is served
    assert moved("dapdee_edge_request_duration_seconds_count", model=model.name) == n + 1
    assert moved("dapdee_edge_received_bytes_total", model=model.name) == (n + 1) * len(body)
    assert moved("dapdee_edge_rejected_total", reason="not_found") == 1  # only the unserved model's refusal
    models = {labels["model"] for labels, _ in after["dapdee_edge_requests_total"]}
    assert models == {model.name, UNKNOWN}  # no version string became a label value


# ---- DapdeeTargetDown under both shipped deployments ------------------------------------------


def _target_down_rule() -> dict[str, Any]:
    """The DapdeeTargetDown rule of deploy/prometheus/rules.yml."""
    doc = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "DapdeeTargetDown"]
    return rule


def compose_targets() -> list[tuple[str, dict[str, str]]]:
    """(dapdee service, the target labels of one planner or edge target) as compose's
    prometheus.yml gives them: its job name, the address and the job's static labels."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    out = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] not in ("planner", "edge"):
            continue
        for group in job.get("static_configs", []):
            for target in group["targets"]:
                out.append((job["job_name"], {"job": job["job_name"], "instance": target, **group.get("labels", {})}))
    return out


def k8s_targets() -> list[tuple[str, dict[str, str]]]:
    """(dapdee service, the target labels of its pod) for each k8s workload whose pods ask to be
    scraped (prometheus.io/scrape), as a typical `kubernetes-pods` job labels them: job, the pod
    address at the annotated port, namespace and pod, and every pod label mapped onto the target
    (`labelmap` of __meta_kubernetes_pod_label_(.+), the label name sanitised as Prometheus does)."""
    out = []
    for name, workload in workloads(k8s_resources()).items():
        meta = workload["spec"]["template"]["metadata"]
        if meta.get("annotations", {}).get("prometheus.io/scrape") != "true":
            continue
        container = dapdee_container(workload)
        assert container is not None, f"{name}: scraped, but runs no dapdee service"
        labels = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels(workload).items()}
        port = meta["annotations"].get("prometheus.io/port", "8000")
        pod = {"job": "kubernetes-pods", "instance": f"10.0.0.1:{port}", "namespace": "dapdee", "pod": f"{name}-0"}
        out.append((container["args"][0], {**labels, **pod}))
    return out


def _render(template: str, labels: dict[str, str]) -> str:
    """`template` with each `{{ $labels.NAME }}` replaced by the label's value (empty when absent),
    as Prometheus renders the alert's labels and annotations."""
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template)


def _series(labels: dict[str, str]) -> str:
    return "up{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _target_down_case(name: str, service: str, labels: dict[str, str], rule: dict[str, Any]) -> dict[str, Any]:
    """A promtool unit test `name`: the target `labels` down from minute 1 fires DapdeeTargetDown at
    minute 4 with the target's labels, severity page and `service`."""
    exp_labels = {**labels, "severity": "page", "service": service}
    return {
        "name": f"{name} target {labels['instance']}",
        "interval": "15s",
        "input_series": [{"series": _series(labels), "values": "1x4 0x12"}],
        "alert_rule_test": [
            {
                "eval_time": "4m",
                "alertname": "DapdeeTargetDown",
                "exp_alerts": [
                    {
                        "exp_labels": exp_labels,
                        "exp_annotations": {k: _render(v, labels) for k, v in rule["annotations"].items()},
                    }
                ],
            }
        ],
    }


def test_target_down_fires_for_every_planner_and_edge_target_of_both_deployments(tmp_path: Path) -> None:
    """For every planner and edge worker target of the shipped deployments (compose's scrape jobs;
    the k8s manifests' pods under a `kubernetes-pods` discovery job), promtool runs the real
    rules.yml on that target's `up` going to 0: DapdeeTargetDown fires for it, with `service` set
    to the dapdee service it runs. Both services are covered in each deployment."""
    rule = _target_down_rule()
    cases = []
    for deployment, targets in (("compose", compose_targets()), ("k8s", k8s_targets())):
        assert {service for service, _ in targets} == {"planner", "edge"}, (deployment, targets)
        cases += [_target_down_case(f"{deployment} {service}", service, labels, rule) for service, labels in targets]
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": cases}
    (tmp_path / "rules.yml").write_text((PROM_DIR / "rules.yml").read_text())
    (tmp_path / "target_down.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False, width=1000))
    r = subprocess.run(
        [promtool(), "test", "rules", "target_down.test.yml"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 0, f"DapdeeTargetDown misses a target:\n{r.stdout}{r.stderr}"
