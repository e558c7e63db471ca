"""Bad command-line input, settings and files: exit 2 naming the option, setting or file, and
files written so that a failed write leaves what was there."""

from __future__ import annotations

import json
import math
import os
import socket
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
        # a traceback from the allocator, and numbers that hung the emulator or priced infinities
        (["graph", MODEL, "--input-shape", "1,3,200000,200000"], "--input-shape"),
        (["train", MODEL, "--out", "unused", "--input-size", "400000"], "--input-size"),
        (["profile", MODEL, "--tier", "device", "--slowdown", "1e300"], "--slowdown"),
        (["profile", MODEL, "--tier", "device", "--repeats", "0"], "--repeats"),
        (["plan", "--profile", "unused", "--bandwidth-mbps", "1e-320"], "--bandwidth-mbps"),
        (["plan", "--profile", "unused", "--bandwidth-mbps", "1", "--rtt-ms", "1e308"], "--rtt-ms"),
        (["device", "run", "--weights", "unused", "--device-only", "--rtt-ms", "1e300"], "--rtt-ms"),
        (["device", "run", "--weights", "unused", "--device-only", "--frame-rate", "1e9"], "--frame-rate"),
        (["up", "--rtt-ms", "1e300"], "--rtt-ms"),
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


TINY_GRAPH = {
    "model": "m",
    "input": {"name": "x", "shape": [1], "bytes": 4},
    "nodes": [{"name": "a", "inputs": ["x"], "out_bytes": 4, "device_ms": 1.0, "edge_ms": 1.0}],
    "exits": [{"name": "final", "node": "a"}],
}
# saves TINY_GRAPH over argv[1] with the process's file size limit at 64 bytes: the write fails
# (EFBIG) part-way, as on a full disk
SAVE_PAST_THE_SIZE_LIMIT = """
import json, resource, signal, sys
from dapdee.costgraph import CostGraph
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
try:
    CostGraph.from_dict(json.loads(sys.argv[2])).save(sys.argv[1])
except OSError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_cost_graph_write_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """A write that fails part-way (the file size limit, as on a full disk) leaves the file as it
    was and no temporary file, and says which file; so does a target that is a folder."""
    graph = CostGraph.from_dict(TINY_GRAPH)
    path = tmp_path / "g.json"
    path.write_text("{}")  # shorter than the new graph: a write past 64 bytes fails
    run = subprocess.run(
        [sys.executable, "-c", SAVE_PAST_THE_SIZE_LIMIT, str(path), json.dumps(TINY_GRAPH)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 3 and str(path) in run.stdout, (run.stdout, run.stderr)
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(OSError, match="folder"):
        graph.save(str(folder))
    assert folder.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "g.json"]
    graph.save(str(path))
    assert CostGraph.load(str(path)).to_dict() == graph.to_dict()
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


def _dapdee(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`dapdee ARGS` in a subprocess without DAPDEE_* or OTEL_* variables (plus `env`)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DAPDEE_", "OTEL_"))}
    exe = str(Path(sys.executable).with_name("dapdee"))
    return subprocess.run([exe, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)


def _one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("dapdee: error: "), run.stderr
    return lines[0]


def test_a_service_whose_port_is_taken_or_whose_otlp_endpoint_is_no_url_exits_with_one_line() -> None:
    """A taken port was uvicorn's start-up, bind error and shut-down (exit 3); a bad OTLP
    endpoint started and failed at every export."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = _one_error_line(_dapdee(["serve", "planner", "--port", port, "--redis-url", "none"]))
        assert f"--port {port}" in line, line
        line = _one_error_line(_dapdee(["serve", "edge", "--port", port, "--models", MODEL]))
        assert f"--port {port}" in line, line
    bad = {"OTEL_EXPORTER_OTLP_ENDPOINT": "notaurl"}
    line = _one_error_line(_dapdee(["serve", "planner", "--port", port, "--redis-url", "none"], bad))
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in line, line


def test_device_inputs_are_named_before_anything_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plan file that is no JSON, a metrics port that is taken, a device id or tier that is no
    name, an uplink slower than a plan request may state: one line naming the option (the model
    is never loaded: --weights names nothing)."""
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text('{"exit": ')
    deep_plan = tmp_path / "deep.json"
    deep_plan.write_text("[" * 100_000)  # nested past the parser's recursion limit
    run = ["device", "run", "--weights", str(tmp_path / "none")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (["--plan", str(bad_plan), "--edge", "http://127.0.0.1:1"], f"--plan {str(bad_plan)!r}: not a JSON plan"),
            (["--plan", str(deep_plan), "--edge", "http://127.0.0.1:1"], f"--plan {str(deep_plan)!r}: not a JSON plan"),
            (["--device-only", "--metrics-port", port], f"--metrics-port: cannot serve on 127.0.0.1:{port}"),
            (["--planner", "http://127.0.0.1:1", "--device-id", "../bad id", "--frame-rate", "10"], "--device-id"),
            (["--planner", "http://127.0.0.1:1", "--device-tier", "../x"], "--device-tier '../x'"),
            (["--device-only", "--network", "1e-300"], "network '1e-300'"),
        ]
        for more, needle in cases:
            assert main([*run, *more]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and needle in err[0] and "model name" not in err[0], (more, err)


def test_a_benchmark_refusing_its_arguments_says_why(capsys: pytest.CaptureFixture) -> None:
    """A benchmark script that stops with a message (not argparse's usage) exited 2 silently."""
    assert main(["bench", "paper", "--networks", "5G"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("dapdee: error: ") and "5G" in err[-1], err


def test_a_device_run_log_that_cannot_be_written_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`device run --log DIR` (a directory): one line naming --log, exit 2, as `up --log` says
    (before: "[Errno 21] Is a directory" without the option)."""
    args = ["device", "run", "--weights", "artifacts/fmnist-alexnet", "--device-only", "--frames", "1", "--quiet"]
    assert main([*args, "--log", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dapdee: error: --log ") and "cannot write the file" in err[-1], err


def test_a_user_factory_that_exits_is_one_error_line_not_a_silent_exit(tmp_path: Path) -> None:
    """A `package.module:factory` that calls sys.exit (at import or when called) ended the
    command with its own code and nothing on stderr; it is a model error naming the spec."""
    (tmp_path / "exiting.py").write_text("import sys\n\ndef model():\n    sys.exit(3)\n")
    (tmp_path / "exiting_import.py").write_text("import sys\nsys.exit(4)\n")
    env = {"PYTHONPATH": str(tmp_path)}
    for spec, why in (("exiting:model", "factory raised SystemExit"), ("exiting_import:model", "cannot import")):
        line = _one_error_line(_dapdee(["graph", spec, "--input-shape", "1,1,8,8"], env))
        assert spec in line and why in line, line
