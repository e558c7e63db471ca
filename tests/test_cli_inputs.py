"""Bad command-line input, settings and files: exit 2 naming the option, setting or file, and
files written so that a failed write leaves what was there."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dapdee.cli import main
from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.edge_worker.config import Settings as EdgeSettings
from dapdee.planner.config import Settings as PlannerSettings

MODEL = "zoo:resnet18?width=0.125"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["profile", MODEL, "--tier", "device", "--threads", "-1"], "--threads"),
        (["profile", MODEL, "--tier", "device", "--threads", "100000"], "--threads"),  # crashed torch
        (["profile", MODEL, "--tier", "device", "--slowdown", "inf"], "--slowdown"),
        (["profile", MODEL, "--tier", "device", "--slowdown", "0.5"], "--slowdown"),
        (["train", MODEL, "--out", "unused", "--lr", "nan"], "--lr"),  # trained to NaN weights, exit 0
        (["train", MODEL, "--out", "unused", "--exit-weights", "nan,1"], "--exit-weights"),
    ],
)
def test_bad_numbers_exit_2_naming_the_option(args: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err.splitlines()[-1], err


def test_a_bad_cost_graph_file_is_named_and_nested_json_is_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    for path, needle in ((deep, "not valid JSON"), (empty, "model: missing")):
        assert main(["plan", "--profile", str(path), "--bandwidth-mbps", "10"]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and needle in err and "Traceback" not in err, err


def test_a_cost_graph_write_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    graph = CostGraph.from_dict(
        {
            "model": "m",
            "input": {"name": "x", "shape": [1], "bytes": 4},
            "nodes": [{"name": "a", "inputs": ["x"], "out_bytes": 4, "device_ms": 1.0, "edge_ms": 1.0}],
            "exits": [{"name": "final", "node": "a"}],
        }
    )
    path = tmp_path / "g.json"
    graph.save(str(path))
    before = path.read_bytes()
    os.mkdir(f"{path}.tmp")  # the temporary file cannot be written
    with pytest.raises(OSError):
        graph.save(str(path))
    assert path.read_bytes() == before and CostGraph.load(str(path)).to_dict() == graph.to_dict()
    with pytest.raises(CostGraphError, match="g.json"):
        (tmp_path / "g.json").write_text("[1, 2")
        CostGraph.load(str(path))


def test_infinite_settings_and_a_redis_url_without_a_scheme_are_refused() -> None:
    """`inf` passes every lower bound; it used to start, then every heartbeat (a TTL of inf ms)
    or every infer (a sleep of inf) answered 500."""
    for kw, field in (({"worker_ttl_s": math.inf}, "worker_ttl_s"), ({"redis_url": "notaurl"}, "redis_url")):
        with pytest.raises(ValidationError, match=field):
            PlannerSettings(**kw)
    with pytest.raises(ValidationError, match="slowdown"):
        EdgeSettings(slowdown=math.inf)
    assert PlannerSettings(redis_url="rediss://h:6380/0").redis_url == "rediss://h:6380/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    for var, value in (("DAPDEE_WORKER_TTL_S", "inf"), ("DAPDEE_REDIS_URL", "notaurl")):
        run = subprocess.run(
            [str(Path(sys.executable).with_name("dapdee")), "serve", "planner", "--port", "1"],
            env={**env, var: value},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 and var in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("command", "var", "value", "field"),
    [
        (["up"], "DAPDEE_RHO_MAX", "abc", "rho_max"),  # the all-in-one demo builds both services' settings
        (["up"], "DAPDEE_EDGE_BATCH_MAX", "0", "batch_max"),
        (["serve", "planner", "--port", "1"], "DAPDEE_PLANMAP_CAP", "-3", "planmap_cap"),
        (["serve", "planner", "--port", "1"], "DAPDEE_REDIS_URL", "redis:/u:hunter2@r:6379", "redis_url"),
        (["serve", "edge", "--port", "1", "--models", MODEL], "DAPDEE_WORKER_TOKEN", "too short", "worker_token"),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_variable_and_never_its_value(
    command: list[str], var: str, value: str, field: str
) -> None:
    """A refused `DAPDEE_*` variable: exit 2 and one line `dapdee: error: <service> settings:
    <field> (<VARIABLE>): <reason>` (pydantic's own error spanned four lines and named only the
    field; a token is read from `DAPDEE_*_TOKEN` whatever the service's prefix), which never
    repeats the value (it may be a secret)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("dapdee")), *command],
        env={**env, var: value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("dapdee: error: ") and f"{field} ({var}): " in lines[0], lines[0]
    assert value not in lines[0].split(f"({var}): ", 1)[1], lines[0]
