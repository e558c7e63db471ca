"""The published JSON Schemas (docs/schemas, draft 2020-12) against what the code really emits:
cost graphs of every zoo model and every shipped artifact (traced, profiled, merged), plans of
the plan map (exact and capped) and of every baseline; the examples of docs/DESIGN.md; and one
mutated document per schema that must fail, naming the field. Also: the repository's design
document exists and nothing in the repository points outside it."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource

from dapdee.cli import main as cli_main
from dapdee.costgraph import CostGraph
from dapdee.models import load_model
from dapdee.planning import BASELINES, PlanMap, PlanRequest, baseline_plan
from dapdee.zoo import ZOO

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "docs" / "schemas"
DESIGN = ROOT / "docs" / "DESIGN.md"
SCHEMA_NAMES = ("cost-graph", "plan", "lease", "problem")
ARTIFACTS = sorted(p.name for p in (ROOT / "artifacts").iterdir() if (p / "manifest.json").is_file())


# ---- validators ------------------------------------------------------------------------------


def _load_schemas() -> dict[str, dict[str, Any]]:
    return {n: json.loads((SCHEMA_DIR / f"{n}.schema.json").read_text()) for n in SCHEMA_NAMES}


SCHEMAS = _load_schemas()
REGISTRY = Registry().with_resources((f"{n}.schema.json", Resource.from_contents(s)) for n, s in SCHEMAS.items())


def validator(ref: str) -> Draft202012Validator:
    """A validator for `ref`: a schema name ("plan") or a name with a JSON pointer
    ("lease#/$defs/device"); cross-file `$ref`s resolve through the registry."""
    name, _, pointer = ref.partition("#")
    target = f"{name}.schema.json" + (f"#{pointer}" if pointer else "")
    return Draft202012Validator({"$ref": target}, registry=REGISTRY)


def errors(ref: str, doc: Any) -> list[ValidationError]:
    return list(validator(ref).iter_errors(doc))


def assert_valid(ref: str, doc: Any) -> None:
    """`doc` satisfies schema `ref` and holds only finite numbers (the contract's rule that JSON
    Schema cannot state: `json.dumps(allow_nan=False)` refuses NaN and infinities)."""
    found = errors(ref, doc)
    assert not found, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in found[:5])
    json.dumps(doc, allow_nan=False)


def assert_invalid_at(ref: str, doc: Any, field: str) -> None:
    """`doc` fails schema `ref`, and some error names `field` (in its path or its message)."""
    found = errors(ref, doc)
    assert found, f"{ref}: the mutated document validated"
    named = [e for e in found if field in [str(p) for p in e.absolute_path] or repr(field) in e.message]
    assert named, f"{ref}: no error names {field!r}: {[e.message for e in found]}"


def test_name_pattern_is_the_code_rule() -> None:
    """One name rule: the schemas' pattern is `dapdee.names.MODEL_NAME_PATTERN`, and it agrees
    with `check_model_name` on edge cases."""
    from dapdee.names import MODEL_NAME_PATTERN, ModelError, check_model_name

    assert SCHEMAS["cost-graph"]["$defs"]["model_name"]["pattern"] == MODEL_NAME_PATTERN
    for name in (
        "a",
        "resnet18",
        "fmnist-resnet18-224",
        "a.b_c-d",
        "x" * 64,
        "x" * 65,
        ".a",
        "-a",
        "a..b",
        "a/b",
        "",
        "a b",
        "é",
    ):
        try:
            ok = check_model_name(name) == name
        except ModelError:
            ok = False
        assert ok == (not errors("cost-graph#/$defs/model_name", name)), name


def test_schemas_are_valid_draft_2020_12() -> None:
    for name, schema in SCHEMAS.items():
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert schema["$id"] == f"{name}.schema.json", name


# ---- cost graphs: zoo, artifacts, CLI ----------------------------------------------------------


def synthetic_timings(g: CostGraph) -> CostGraph:
    """Both tiers' timings from FLOPs (deterministic; the edge ~10x faster): planning input only,
    not a measurement. O(V)."""
    dev = {n.name: 0.02 + n.flops / 2e7 for n in g.nodes}
    edge = {n.name: 0.002 + n.flops / 2e8 for n in g.nodes}
    return g.with_timings("device", dev).with_timings("edge", edge)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_cost_graphs_validate(name: str) -> None:
    g = load_model(f"zoo:{name}?width=0.125").graph
    doc = g.to_dict()
    assert "meta" in doc and "shape" in doc["nodes"][0]
    assert_valid("cost-graph", doc)
    assert_valid("cost-graph", synthetic_timings(g).to_dict())


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_artifact_cost_graphs_validate(artifact: str) -> None:
    loaded = load_model("", weights=ROOT / "artifacts" / artifact)
    doc = loaded.graph.to_dict()
    assert doc["input"]["dtype"] == "uint8"
    assert any(e["accuracy"] is not None for e in doc["exits"])
    assert_valid("cost-graph", doc)
    float_input = load_model("", weights=ROOT / "artifacts" / artifact, frame_input=False).graph
    assert_valid("cost-graph", float_input.to_dict())


def test_cli_graph_profile_and_merge_outputs_validate(tmp_path: Path) -> None:
    spec = "zoo:alexnet?width=0.125"
    g, d, e, m = (str(tmp_path / f) for f in ("g.json", "d.json", "e.json", "m.json"))
    assert cli_main(["graph", spec, "--out", g]) == 0
    assert cli_main(["profile", spec, "--tier", "device", "--repeats", "1", "--slowdown", "4", "--out", d]) == 0
    assert cli_main(["profile", spec, "--tier", "edge", "--repeats", "1", "--out", e]) == 0
    assert cli_main(["profile", "--merge", d, e, "--out", m]) == 0
    for path in (g, d, e, m):
        assert_valid("cost-graph", json.loads(Path(path).read_text()))
    merged = json.loads(Path(m).read_text())
    assert merged["meta"]["device"]["slowdown"] == 4
    assert all(n["device_ms"] is not None and n["edge_ms"] is not None for n in merged["nodes"])


def test_cost_graph_with_overheads_validates_and_round_trips() -> None:
    g = synthetic_timings(load_model("zoo:resnet18?width=0.125").graph)
    doc = g.to_dict()
    doc["overheads"] = {"device_request_ms": 0.8, "edge_request_ms": 3.1}
    assert_valid("cost-graph", doc)
    again = CostGraph.from_dict(doc).to_dict()
    assert again["overheads"] == doc["overheads"]
    assert_valid("cost-graph", again)
    assert_valid("cost-graph", {**doc, "meta": None, "progressive": None})  # null: none, as from_dict reads it
    pm = PlanMap.build(CostGraph.from_dict(again))
    for req in REQUESTS:
        assert_valid("plan", pm.plan(req))


# ---- plans: plan map (exact and capped) and baselines -----------------------------------------

REQUESTS = (
    PlanRequest(bandwidth_mbps=1.1, rtt_ms=20.0, device_load=0.3),
    PlanRequest(bandwidth_mbps=5.85, rtt_ms=10.0, edge_load=0.2, latency_budget_ms=0.5, mode="latency"),
    PlanRequest(bandwidth_mbps=0.13, rtt_ms=50.0, device_load=0.5, frame_rate=200.0, mode="auto"),
    PlanRequest(bandwidth_mbps=18.88, rtt_ms=5.0, frame_rate=30.0, min_accuracy=0.9, mode="throughput"),
    PlanRequest(bandwidth_mbps=3.0, min_accuracy=0.999, latency_budget_ms=1e4, mode="latency"),
)


def _plan_graphs() -> Iterator[tuple[str, CostGraph]]:
    for artifact in ("fmnist-alexnet", "fmnist-resnet18"):
        yield artifact, synthetic_timings(load_model("", weights=ROOT / "artifacts" / artifact).graph)
    untrained = synthetic_timings(load_model("zoo:inception?width=0.125").graph)  # null accuracies
    yield "inception-untrained", untrained


PLAN_GRAPHS = dict(_plan_graphs())


@pytest.mark.parametrize("graph_name", sorted(PLAN_GRAPHS))
def test_plan_map_plans_validate(graph_name: str) -> None:
    g = PLAN_GRAPHS[graph_name]
    seen_modes = set()
    approximate = set()
    for cap in (100_000, 10):
        pm = PlanMap.build(g, cap)
        for req in REQUESTS:
            plan = pm.plan(req)
            assert_valid("plan", plan)
            seen_modes.add(plan["mode"])
            approximate.add(plan["approximate"])
    assert seen_modes == {"latency", "throughput"}
    assert True in approximate  # the capped maps answered some throughput walk approximately


@pytest.mark.parametrize("baseline", BASELINES)
def test_baseline_plans_validate(baseline: str) -> None:
    g = PLAN_GRAPHS["fmnist-resnet18"]
    for req in REQUESTS:
        plan = baseline_plan(g, req, baseline)
        assert plan["planner"] == baseline
        assert_valid("plan", plan)


def test_plan_with_service_fields_validates() -> None:
    """A service answer: the core plan plus the worker URL and a lease."""
    plan = PlanMap.build(PLAN_GRAPHS["fmnist-alexnet"]).plan(REQUESTS[0])
    plan["edge_worker"] = "http://127.0.0.1:8001"
    plan["lease"] = {
        "device_id": "cam-7",
        "model": plan["model"],
        "worker": "http://127.0.0.1:8001",
        "frames_per_s": 10.0,
        "edge_ms_per_frame": 1.25,
        "expires_in_s": 30.0,
        "replan_after_s": 5.0,
    }
    plan["predicted"]["expected_latency_ms"] = plan["predicted"]["latency_ms"] * 0.5
    assert_valid("plan", plan)
    assert_valid(
        "lease#/$defs/device",
        {"device_id": "cam-7", "model": plan["model"], "lease": plan["lease"], "plan": plan, "assigned": False},
    )


# ---- negative cases: a mutated document fails, naming the field --------------------------------


def _graph_doc() -> dict[str, Any]:
    return PLAN_GRAPHS["fmnist-resnet18"].to_dict()


def _plan_doc() -> dict[str, Any]:
    return PlanMap.build(PLAN_GRAPHS["fmnist-alexnet"]).plan(REQUESTS[0])


def test_cost_graph_mutations_fail_naming_the_field() -> None:
    d = _graph_doc()
    d["nodes"][3]["out_bytes"] = -1
    assert_invalid_at("cost-graph", d, "out_bytes")
    d = _graph_doc()
    d["nodes"][0]["device_ms"] = "1.5"
    assert_invalid_at("cost-graph", d, "device_ms")
    d = _graph_doc()
    del d["exits"]
    assert_invalid_at("cost-graph", d, "exits")
    d = _graph_doc()
    d["exits"][0]["accuracy"] = 1.5
    assert_invalid_at("cost-graph", d, "accuracy")
    d = _graph_doc()
    d["input"]["dtype"] = "complex64"
    assert_invalid_at("cost-graph", d, "dtype")
    d = _graph_doc()
    d["model"] = "../etc"
    assert_invalid_at("cost-graph", d, "model")
    d = _graph_doc()
    d["overheads"] = {"edge_request_ms": -3.0}
    assert_invalid_at("cost-graph", d, "edge_request_ms")
    d = _graph_doc()
    d["input"]["shape"] = [2, *d["input"]["shape"][1:]]  # a frame's shape: batch 1 first
    assert_invalid_at("cost-graph", d, "shape")
    d = _graph_doc()
    d["nodes"][1]["colour"] = "red"
    assert_invalid_at("cost-graph", d, "colour")
    d = _graph_doc()
    d["meta"] = {"anything": {"goes": [1, None]}, "spec": "zoo:resnet18"}  # meta stays open
    assert_valid("cost-graph", d)


def test_plan_mutations_fail_naming_the_field() -> None:
    d = _plan_doc()
    d["predicted"]["latency_ms"] = "fast"
    assert_invalid_at("plan", d, "latency_ms")
    d = _plan_doc()
    d["mode"] = "auto"  # a plan names the mode it resolved to
    assert_invalid_at("plan", d, "mode")
    d = _plan_doc()
    del d["approximate"]
    assert_invalid_at("plan", d, "approximate")
    d = _plan_doc()
    d["transfer"] = [{"node": "x", "bytes": 1.5}]
    assert_invalid_at("plan", d, "bytes")
    d = _plan_doc()
    d["planner"] = "greedy"
    assert_invalid_at("plan", d, "planner")
    d = _plan_doc()
    d["lease"] = {
        "worker": "http://127.0.0.1:8001",
        "frames_per_s": 0,
        "edge_ms_per_frame": 1.0,
        "expires_in_s": 30,
        "replan_after_s": 5,
    }
    assert_invalid_at("plan", d, "frames_per_s")
    d = _plan_doc()
    d["surprise"] = 1
    assert_invalid_at("plan", d, "surprise")


def test_lease_mutations_fail_naming_the_field() -> None:
    good = {
        "worker": "http://edge-1:8000",
        "frames_per_s": 30.0,
        "edge_ms_per_frame": 5.15625,
        "expires_in_s": 30.0,
        "replan_after_s": 10.0,
    }
    assert_valid("lease", good)
    assert_valid("lease", {**good, "worker": None, "edge_ms_per_frame": 0.0})
    d = dict(good)
    del d["frames_per_s"]
    assert_invalid_at("lease", d, "frames_per_s")
    assert_invalid_at("lease", {**good, "edge_ms_per_frame": -1.0}, "edge_ms_per_frame")
    assert_invalid_at("lease", {**good, "worker": "edge-1:8000"}, "worker")
    assert_invalid_at("lease", {**good, "device_id": "a/b"}, "device_id")


def test_the_sdk_lease_model_accepts_the_leases_the_schema_accepts() -> None:
    """`dapdee.api.planner.LeaseInfo`, which the planner answers with and the SDK reads a plan's
    lease with, agrees with lease.schema.json on which fields must be there and on every number's
    bounds: a lease the schema allows (`replan_after_s` 0, `expires_in_s` 0, no `device_id` or
    `model`) is never refused, and one it refuses is. (Names, the worker URL and JSON types:
    `tests/test_sdk_planner.py`, through the SDK.)"""
    from pydantic import ValidationError as ModelError

    from dapdee.api.planner import LEASE_EXAMPLE, LeaseInfo

    good = dict(LEASE_EXAMPLE)
    docs = [good, {**good, "worker": None}] + [{k: v for k, v in good.items() if k != gone} for gone in good]
    for key in ("frames_per_s", "edge_ms_per_frame", "expires_in_s", "replan_after_s"):
        docs += [{**good, key: v} for v in (0, 0.0, 1e-9, -1e-9, -1.0)]
    verdicts = []
    for doc in docs:
        try:
            LeaseInfo.model_validate(doc)
            accepted = True
        except ModelError:
            accepted = False
        verdicts.append((not errors("lease", doc), accepted))
        assert verdicts[-1] in ((True, True), (False, False)), (doc, "(schema allows it, SDK accepts it)", verdicts[-1])
    assert (True, True) in verdicts and (False, False) in verdicts


def test_the_sdk_plan_model_declares_every_field_the_plan_schema_lists() -> None:
    """`dapdee.api.planner.PlanAnswer`, which the planner answers with and the SDK reads plans
    with, ignores fields it does not declare: it declares every property plan.schema.json lists,
    at the top and in `predicted` (all six `expected_*` of a confidence-exit plan), `exit` and
    `transfer`, and none the schema does not list."""
    from pydantic import BaseModel

    from dapdee.api.planner import PlanAnswer, PlanExit, PlanPredicted, PlanTransfer

    props = SCHEMAS["plan"]["properties"]
    pairs: list[tuple[dict[str, Any], type[BaseModel]]] = [
        (props, PlanAnswer),
        (props["predicted"]["properties"], PlanPredicted),
        (props["exit"]["properties"], PlanExit),
        (props["transfer"]["items"]["properties"], PlanTransfer),
    ]
    for schema_props, model in pairs:
        assert set(model.model_fields) == set(schema_props), (
            model.__name__,
            set(schema_props) ^ set(model.model_fields),
        )


def test_problem_mutations_fail_naming_the_field() -> None:
    good = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "unknown model 'x'"}
    assert_valid("problem", good)
    invalid = {
        "type": "urn:dapdee:validation",
        "title": "Unprocessable Content",
        "status": 422,
        "detail": "bandwidth_mbps: must be > 0",
        "errors": [
            {"loc": ["body", "bandwidth_mbps"], "msg": "Input should be greater than 0", "type": "greater_than"}
        ],
    }
    assert_valid("problem", invalid)
    d = dict(invalid)
    del d["errors"]  # every 422 lists its errors
    assert_invalid_at("problem", d, "errors")
    assert_invalid_at("problem", {**good, "status": 200}, "status")
    assert_invalid_at("problem", {**good, "type": "https://example.com/x"}, "type")
    d = dict(good)
    del d["title"]
    assert_invalid_at("problem", d, "title")
    assert_invalid_at("problem", {**invalid, "errors": [{"loc": ["body"], "msg": "x"}]}, "type")


# ---- docs/DESIGN.md: its examples obey the schemas and the planner ------------------------------

EXAMPLE_RE = re.compile(r"<!-- schema: (?P<tag>[^>]*?) -->\s*```json\n(?P<body>.*?)\n```", re.S)


def design_examples() -> list[tuple[dict[str, str], Any]]:
    """(tag fields, parsed JSON) of every fenced JSON block preceded by `<!-- schema: ... -->`;
    the tag is `REF[; key: value]...` (REF a schema name, optionally with `#pointer`)."""
    out = []
    for m in EXAMPLE_RE.finditer(DESIGN.read_text()):
        parts = [p.strip() for p in m.group("tag").split(";")]
        tag = {"ref": parts[0]}
        for p in parts[1:]:
            k, _, v = p.partition(":")
            tag[k.strip()] = v.strip()
        out.append((tag, json.loads(m.group("body"))))
    return out


def test_design_doc_exists_and_covers_every_schema() -> None:
    assert DESIGN.is_file()
    text = DESIGN.read_text()
    for name in SCHEMA_NAMES:
        assert f"schemas/{name}.schema.json" in text
    refs = {tag["ref"].partition("#")[0] for tag, _ in design_examples()}
    assert refs == set(SCHEMA_NAMES)


def test_design_examples_validate() -> None:
    examples = design_examples()
    assert len(examples) >= 6
    for tag, doc in examples:
        assert_valid(tag["ref"], doc)


def test_design_example_plans_are_what_the_planner_answers() -> None:
    """Each example tagged `from: GRAPH[; overheads: {...}]; request: {...}` is the plan map's
    answer for the example graph tagged `example: GRAPH` (with those overheads), plan_id
    included (equal inputs, equal ids)."""
    examples = design_examples()
    graphs = {t["example"]: d for t, d in examples if t["ref"] == "cost-graph" and "example" in t}
    checked = 0
    for tag, doc in examples:
        if "from" not in tag:
            continue
        graph = dict(graphs[tag["from"]])
        if "overheads" in tag:
            graph["overheads"] = json.loads(tag["overheads"])
        pm = PlanMap.build(CostGraph.from_dict(graph))
        plan = pm.plan(PlanRequest(**json.loads(tag["request"])))
        for key in ("edge_worker", "lease"):
            plan.pop(key, None)
            doc = {k: v for k, v in doc.items() if k != key}
        assert _rounded(plan) == _rounded(doc)
        checked += 1
    assert checked >= 3


def _rounded(v: Any) -> Any:
    """Floats to 6 significant digits (the document prints at most that), recursively."""
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


# ---- nothing in the repository points outside it -------------------------------------------------

FORBIDDEN = ("../" + "shared", "shared" + "/DESIGN")  # spelt in pieces so this file passes too


def repository_files() -> list[Path]:
    """Files git tracks or would track (untracked, not ignored); without git, every file outside
    .git and .venv."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
        return [ROOT / n for n in names if not n.startswith((".venv/", ".git/"))]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_no_file_points_outside_the_repository() -> None:
    offenders = []
    for path in repository_files():
        if not path.is_file():
            continue  # listed by git but deleted in the working tree
        data = path.read_bytes()
        for s in FORBIDDEN:
            if s.encode() in data:
                offenders.append(f"{path.relative_to(ROOT)} ({s})")
    assert not offenders, "files citing the brief outside the repository: " + ", ".join(offenders)
