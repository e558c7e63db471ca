"""The Grafana dashboard (deploy/grafana/dashboards/dapdee.json) read as Grafana and Prometheus
read it, offline: unique ids, a sane non-overlapping grid, the provisioned datasource on every
query, every query valid PromQL (promtool parses it) over known metrics and labels, and a Fleet
row with the fleet views. (tests/test_deploy.py checks the queries against live services.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.observability import (
    CATALOGUE,
    LAZY,
    allowed_labels,
    exported_by_code,
    known_metrics,
    labels_used,
    legend_labels,
    metric_names,
    promtool,
    series_names,
)

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dapdee.json"
GRID_WIDTH = 24
# Grafana's built-in interval variables, as a real Prometheus query would have them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
FLEET_VIEWS = {  # what the Fleet row must show -> a metric one of its queries reads
    "devices per worker": "dapdee_planner_worker_leases",
    "reserved ms per worker": "dapdee_planner_worker_leased_ms_per_second",
    "capacity per worker": "dapdee_planner_worker_capacity_ms_per_second",
    "measured utilisation": "dapdee_edge_compute_busy_seconds_total",
    "compute slots": "dapdee_edge_compute_slots",
    "measured latency": "dapdee_device_frame_latency_seconds_bucket",
    "prediction error": "dapdee_device_prediction_error_ratio_bucket",
    "exits chosen": "dapdee_device_plan_info",
    "fallbacks": "dapdee_device_frames_total",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed panels included, rows themselves included."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dash) if p["type"] != "row"]


def provisioned_uid() -> str:
    (ds_file,) = (GRAFANA / "provisioning" / "datasources").glob("*.yml")
    (prom,) = [d for d in yaml.safe_load(ds_file.read_text())["datasources"] if d["type"] == "prometheus"]
    return str(prom["uid"])


def test_ids_are_unique_and_the_dashboard_is_read_only() -> None:
    dash = dashboard()
    ids = [p["id"] for p in all_panels(dash)]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert dash["uid"] and dash["editable"] is False and isinstance(dash["schemaVersion"], int)


def test_grid_positions_are_sane_and_do_not_overlap() -> None:
    boxes = []
    for p in all_panels(dashboard()):
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), f"panel {p['title']}: {g}"
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, f"panel {p['title']}: {g}"
        assert g["x"] + g["w"] <= GRID_WIDTH, f"panel {p['title']} is wider than the grid: {g}"
        if p["type"] == "row":
            assert (g["x"], g["w"], g["h"]) == (0, GRID_WIDTH, 1), f"row {p['title']}: {g}"
        boxes.append((p["title"], g))
    for i, (a, ga) in enumerate(boxes):
        for b, gb in boxes[i + 1 :]:
            overlap = (
                ga["x"] < gb["x"] + gb["w"]
                and gb["x"] < ga["x"] + ga["w"]
                and ga["y"] < gb["y"] + gb["h"]
                and gb["y"] < ga["y"] + ga["h"]
            )
            assert not overlap, f"panels {a!r} {ga} and {b!r} {gb} overlap"


def test_every_query_uses_the_provisioned_datasource() -> None:
    uid = provisioned_uid()
    for p in query_panels(dashboard()):
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, f"panel {p['title']}: {p['datasource']}"
        assert p["targets"], f"panel {p['title']}: no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['title']}: duplicate refIds {refs}"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": uid}, f"panel {p['title']}: {t['datasource']}"
            assert t.get("expr", "").strip(), f"panel {p['title']}: empty query"


def targets() -> list[tuple[str, str, str]]:
    """(panel title, PromQL, legend) of every query."""
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in query_panels(dashboard()) for t in p["targets"]]


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables filled in) as a recording rule."""
    rules = []
    for i, (title, expr, _) in enumerate(targets()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"panel {title!r}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promql_check_catches_a_bad_query(tmp_path: Path) -> None:
    """Negative control: promtool refuses a malformed query the same way."""
    path = tmp_path / "bad.yml"
    bad = "sum by (worker (dapdee_planner_worker_leases)"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": bad}]}]}))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0


def test_queries_read_known_metrics_and_labels() -> None:
    metrics = known_metrics()
    series = series_names(metrics)
    for title, expr, legend in targets():
        used = metric_names(expr)
        assert used, f"panel {title!r}: no dapdee metric in {expr}"
        assert used <= set(series), f"panel {title!r}: unknown metrics {sorted(used - set(series))}"
        allowed = allowed_labels(expr, metrics)
        assert labels_used(expr) <= allowed, f"panel {title!r}: labels {sorted(labels_used(expr) - allowed)}"
        assert legend_labels(legend) <= allowed, (
            f"panel {title!r}: legend uses {sorted(legend_labels(legend) - allowed)}"
        )
        for name in used:  # rate() only on counters and histogram parts
            kind = metrics[series[name]].kind
            if re.search(rf"\b(?:rate|irate|increase)\(\s*{name}\b", expr):
                assert kind == "counter" or name.endswith(("_bucket", "_sum", "_count")), (
                    f"panel {title!r}: rate() of the {kind} {name}"
                )


def test_the_fleet_row_shows_the_fleet() -> None:
    dash = dashboard()
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    fleet = [r for r in rows if r["title"] == "Fleet"]
    assert len(fleet) == 1, f"rows: {[r['title'] for r in rows]}"
    row = fleet[0]
    # a row owns the panels after it (until the next row); collapsed, the ones it holds
    after = dash["panels"][dash["panels"].index(row) + 1 :]
    nxt = next((i for i, p in enumerate(after) if p["type"] == "row"), len(after))
    panels = row["panels"] if row.get("collapsed") else after[:nxt]
    assert panels, "the Fleet row is empty"
    assert all(p["gridPos"]["y"] > row["gridPos"]["y"] for p in panels)
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for view, metric in FLEET_VIEWS.items():
        assert metric in exprs, f"the Fleet row has no {view} ({metric})"
    assert re.search(r'dapdee_device_frames_total\{where="fallback"\}', exprs), "no fallback rate"
    assert re.search(r"by \(worker\)[^;]*dapdee_planner_worker_leases", exprs), "devices per worker"
    # the panels that existed before the row are still there, above it
    above = dash["panels"][: dash["panels"].index(row)]
    assert len(above) >= 15 and all(p["gridPos"]["y"] < row["gridPos"]["y"] for p in above)


def test_catalogue_matches_the_code() -> None:
    """Every metric of the contract is exported by the code (a renamed or removed metric fails
    here, not silently in Grafana), as the same type with the same label names, read from the
    code's collectors (so a labelled metric that holds no sample at start is checked too)."""
    code = exported_by_code()
    missing = sorted(set(CATALOGUE) - set(code))
    assert not missing, f"in the metric contract (tests/observability.py) but not exported by the code: {missing}"
    for name, want in CATALOGUE.items():
        m = code[name]
        kind = "gauge" if m.kind == "info" else m.kind  # an info metric is a constant-1 gauge
        assert kind == want.kind, f"{name}: the code has a {m.kind}, the contract a {want.kind}"
        assert m.labels == want.labels, (
            f"{name}: labels {sorted(m.labels)} in the code, the contract {sorted(want.labels)}"
        )


def test_lazy_metrics_are_what_their_call_registers() -> None:
    """The metrics `LAZY` lists are not registered by their class's constructor, are by the
    listed call, and that call registers nothing else: a lazy metric renamed in the code, or an
    entry whose call no longer registers it, fails here."""
    eager, everything = exported_by_code(lazy=False), exported_by_code(lazy=True)
    listed = set().union(*(entry.names for entry in LAZY))
    added = set(everything) - set(eager)
    assert added == listed, f"the LAZY calls register {sorted(added)}, LAZY lists {sorted(listed)}"
    assert not listed & set(eager)


def test_the_label_check_sees_labels_without_samples() -> None:
    """Negative control: a labelled metric that holds no sample yet (the planner's per-worker
    gauges before the first fleet refresh, the edge's request counter before the first request)
    still has its label names, so a query grouping by a renamed label is refused."""
    code = exported_by_code()
    assert code["dapdee_planner_worker_leased_ms_per_second"].labels == {"worker"}
    assert code["dapdee_edge_requests_total"].labels == {"model", "exit", "status"}
    expr = "sum by (url) (dapdee_planner_worker_leased_ms_per_second)"
    assert "url" not in allowed_labels(expr, known_metrics())
