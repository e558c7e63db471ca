"""`dapdee device run` and `dapdee up` on the real stack: per-frame JSON lines, an image folder
as the source, a fixed plan from a file instead of a planner, and one-line errors for what a
user gets wrong."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dapdee.cli import main
from dapdee.device.up import find_artifact
from dapdee.models import load_model
from dapdee.testing import bind_free_socket
from tests.device_stack import SPEC, Stack

REPO = Path(__file__).resolve().parent.parent


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    got = capsys.readouterr()
    return rc, got.out, got.err.strip()


def test_device_run_logs_json_lines(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "frames.jsonl"
    args = ["device", "run", "--planner", stack.planner.url, "--weights", str(stack.artifact), "--network", "4G"]
    args += ["--frames", "4", "--log", str(log), "--quiet", "--device-load", "0", "--mode", "latency"]
    args += ["--profile", str(tmp_path / "device.json")]
    rc, out, _ = _cli(args, capsys)
    assert rc == 0
    assert "K=10" in out and "5.85 Mbit/s" in out
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 4
    assert {"predicted_ms", "measured_ms", "exit", "device_nodes", "bytes_sent", "where", "pred_class"} <= set(rows[0])
    assert all(r["rate_mbps"] == 5.85 and r["slowdown"] == 10.0 for r in rows)
    assert (tmp_path / "device.json").is_file()  # the measured profile is kept for the next run


def test_device_run_on_an_image_folder(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Images in class folders are classified with labels (accuracy reported); an unreadable one
    is skipped and counted."""
    import av

    for c, level in (("a", 30), ("b", 220)):
        for i in range(2):
            path = tmp_path / "pics" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(path), "w", format="image2") as out:
                stream = out.add_stream("png")
                stream.width, stream.height, stream.pix_fmt = 28, 28, "rgb24"
                pixels = np.full((28, 28, 3), level + i, np.uint8)
                for packet in [*stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *stream.encode()]:
                    out.mux(packet)
    (tmp_path / "pics" / "b" / "bad.png").write_bytes(b"\x89PNG broken")
    log = tmp_path / "frames.jsonl"
    args = ["device", "run", "--planner", stack.planner.url, "--weights", str(stack.artifact), "--quiet"]
    args += ["--source", str(tmp_path / "pics"), "--log", str(log), "--device-load", "0", "--mode", "latency"]
    rc, out, _ = _cli(args, capsys)
    assert rc == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["label"] for r in rows] == [0, 0, 1, 1] and all(r["correct"] is not None for r in rows)
    assert "accuracy" in out and "frames skipped by the source: 1" in out and "bad.png" in out


def _plan_file(stack: Stack, path: Path) -> Any:
    """The stack's mid cut written to `path` as a plan JSON (no worker named); the plan."""
    plan = stack.mid_cut(stack.edge.url)
    doc = {
        "plan_id": "from-file", "model": stack.graph.model, "mode": "latency", "exit": {"name": plan.exit},
        "device_nodes": list(plan.device_nodes), "edge_nodes": list(plan.edge_nodes),
        "transfer": [{"node": n, "bytes": b} for n, b in plan.transfer],
        "predicted": {"latency_ms": 50.0, "bottleneck_ms": 20.0}, "edge_worker": None,
    }  # fmt: skip
    path.write_text(json.dumps(doc))
    return plan


def test_device_run_with_a_fixed_plan(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--plan FILE --edge URL: no planner at all; the plan's cut is run as given."""
    plan = _plan_file(stack, tmp_path / "plan.json")
    log = tmp_path / "frames.jsonl"
    args = ["device", "run", "--plan", str(tmp_path / "plan.json"), "--edge", stack.edge.url, "--quiet"]
    args += ["--weights", str(stack.artifact), "--frames", "3", "--log", str(log), "--device-load", "0"]
    args += ["--profile", str(tmp_path / "device.json")]
    rc, _, _ = _cli(args, capsys)
    assert rc == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["where"], r["plan_id"], r["device_nodes"]) for r in rows] == [("edge", "from-file", plan.cut)] * 3


def test_a_fixed_plan_sends_the_token_to_its_worker(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plan FILE --edge URL --token T, the worker requiring T: no planner is given, yet the
    token goes with every infer request, so the frames are answered by the edge (not refused
    with 401 and finished on the device)."""
    from dapdee.edge_worker.app import create_app
    from dapdee.edge_worker.config import Settings
    from dapdee.testing import ServerThread

    token = "fixed-plan-device-token-0123456789"
    sock = bind_free_socket()
    es = Settings(models=f"@{stack.artifact}", port=sock.getsockname()[1], workers=1, api_token=token)
    edge = ServerThread(create_app(es, [stack.edge_loaded]), sock=sock, name="edge-token").start()
    try:
        _plan_file(stack, tmp_path / "plan.json")
        log = tmp_path / "frames.jsonl"
        args = ["device", "run", "--plan", str(tmp_path / "plan.json"), "--edge", edge.url, "--token", token]
        args += ["--weights", str(stack.artifact), "--frames", "2", "--log", str(log), "--device-load", "0"]
        args += ["--profile", str(tmp_path / "device.json"), "--quiet"]
        rc, _, _ = _cli(args, capsys)
    finally:
        edge.stop()
    assert rc == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["where"], r["error"]) for r in rows] == [("edge", None)] * 2


def test_bad_planner_url_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    sock = bind_free_socket()  # bound, never listening: connection refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        rc, _, err = _cli(["device", "run", "--planner", url, "--model", SPEC, "--frames", "1", "--quiet"], capsys)
    finally:
        sock.close()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot reach the planner" in err, err
    rc, _, err = _cli(["device", "run", "--planner", "not a url", "--model", SPEC, "--quiet"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "planner" in err, err


@pytest.mark.parametrize("bad", ["notaurl", "ftp://127.0.0.1:8000", "http://"])
def test_a_bad_edge_url_fails_with_one_line_naming_edge(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    """A fixed plan with an --edge that is no http(s) URL is refused before any frame runs (it
    would run every frame as a fallback and exit 0)."""
    _plan_file(stack, tmp_path / "plan.json")
    log = tmp_path / "frames.jsonl"
    args = ["device", "run", "--plan", str(tmp_path / "plan.json"), "--edge", bad, "--quiet", "--frames", "2"]
    args += ["--weights", str(stack.artifact), "--device-load", "0", "--log", str(log)]
    rc, out, err = _cli(args, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--edge" in err and repr(bad) in err, (rc, err)
    assert out == "" and not log.exists()


@pytest.mark.parametrize("value", ["inf", "nan", "0.5"])
@pytest.mark.parametrize("command", ["device", "up"])
def test_a_bad_slowdown_fails_with_one_line_naming_it(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--slowdown must be a finite K >= 1, for `device run` and `dapdee up` alike."""
    first = ["device", "run", "--device-only", "--model", SPEC] if command == "device" else ["up", "--networks", "4G"]
    rc, out, err = _cli([*first, "--slowdown", value, "--frames", "1", "--quiet"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--slowdown" in err, (rc, err)
    assert out == ""


def test_a_lease_needs_a_frame_rate(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["device", "run", "--planner", stack.planner.url, "--model", SPEC, "--device-id", "cam-1", "--quiet"]
    rc, _, err = _cli(args, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--frame-rate" in err, err


def test_unknown_model_fails_with_one_line(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    url = stack.planner.url
    rc, _, err = _cli(["device", "run", "--planner", url, "--model", "nosuchmodel", "--quiet"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "no model 'nosuchmodel'" in err, err
    rc, _, err = _cli(["device", "run", "--planner", url, "--model", "zoo:nosuch", "--quiet"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown zoo model" in err, err
    # a bare name never makes the device import what the planner's stored graph names, and a
    # graph taking raw frames needs the artifact (its first node normalises them)
    imported = stack.loaded.graph.to_dict() | {"model": "imported", "meta": {"spec": "os.path:join"}}
    frames = load_model("", weights=REPO / "artifacts" / "fmnist-alexnet", name="framed").graph.to_dict()
    for name, body, why in (("imported", imported, "would import code"), ("framed", frames, "raw uint8 frames")):
        assert httpx.put(f"{url}/models/{name}", json=body, timeout=10).status_code < 300
        rc, _, err = _cli(["device", "run", "--planner", url, "--model", name, "--quiet"], capsys)
        assert rc == 2 and len(err.splitlines()) == 1 and why in err, err


def _up(*extra: str) -> str:
    """`dapdee up` with `extra` arguments in a subprocess (no DAPDEE_ settings); its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "dapdee.cli", "up", "--quiet", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_dapdee_up_runs_the_demo() -> None:
    out = _up("--frames", "6")
    for word in ("3G", "4G", "WiFi", "Device-Only", "K=30", "pred ms", "meas ms", "why these cuts"):
        assert word in out, out
    device_only = next(line for line in out.splitlines() if line.startswith("Device-Only"))
    assert "0/6/0" in device_only, device_only  # all 6 frames on the device, none lost
    # the camera-size default cuts mid-network on some uplink, and the reason table prices that cut
    table = out.split("why these cuts")[0].splitlines()
    assert any(" mid " in line for line in table if line.startswith(("3G", "4G", "WiFi"))), out
    reasons = out.split("why these cuts")[1].splitlines()
    assert sum(line.startswith(("3G", "4G", "WiFi")) for line in reasons) == 3, out


def test_dapdee_up_with_confidence_exits_counts_the_cut_against_the_plans_exit() -> None:
    out = _up("--frames", "12", "--networks", "4G", "--confidence-exits")
    lines = out.splitlines()
    head = re.split(r"\s{2,}", lines[1].strip())
    rows = {
        cells[0]: dict(zip(head, cells, strict=True)) for cells in (re.split(r"\s{2,}", x.strip()) for x in lines[3:5])
    }
    assert "confidence exits" in lines[0] and "confidence exits: pred ms" in out, out
    graph = load_model("", weights=find_artifact(None)).graph
    final = graph.exits[-1]
    need = len(graph.ancestors(final.node))
    # heads answered frames before the plan's exit, yet the cut and the accuracy are the plan's
    assert rows["4G"]["exit"] != final.name or "(+" in rows["4G"]["exit"], out
    device_nodes, of = rows["4G"]["cut dev/all"].split("/")
    assert int(of) == need and 0 <= int(device_nodes) <= need, out
    assert rows["4G"]["exit acc"] == f"{final.accuracy:.3f}", out
    assert rows["Device-Only"]["cut dev/all"] == f"{need}/{need}", out


@pytest.mark.parametrize("after_s", [0.0, 7.0])
def test_sigterm_ends_a_device_run_releasing_its_lease(planner_prefix: str, tmp_path: Path, after_s: float) -> None:
    """`dapdee device run` with a lease, stopped by SIGTERM (a container's stop, systemd) as soon
    as its first plan took the lease (still starting: it waits for a worker) or `after_s` later
    (streaming frames): it closes as Ctrl-C does, so its lease ends at once (GET /devices/{id}
    is 404) instead of holding its reservation until it expires (30 s), and it exits 143 naming
    the signal. (SIGTERM killed it outright; and a device stopped while starting never released
    the lease its first plan took, whatever stopped it.)"""
    import signal
    import time

    from dapdee.testing.processes import end_process
    from tests.test_planner_service import TOKEN, planner, wait_for

    graph = load_model(SPEC).graph  # with edge timings (no worker profiles the edge here)
    graph = graph.with_timings("edge", {n.name: 0.1 for n in graph.nodes})
    graph = graph.with_timings("device", {n.name: 1.0 for n in graph.nodes})
    log = tmp_path / "stderr.txt"
    with planner(planner_prefix, lease_ttl_s=30.0) as c, log.open("wb") as err_file:
        assert c.put(f"/models/{graph.model}", json=graph.to_dict()).status_code == 201
        args = ["device", "run", "--planner", str(c.base_url).rstrip("/"), "--token", TOKEN,
                "--admin-token", TOKEN, "--model", SPEC, "--device-id", "cam-term", "--frame-rate", "2",
                "--frames", "100000", "--quiet", "--log-level", "info", "--log-format", "text"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
        proc = subprocess.Popen([sys.executable, "-m", "dapdee.cli", *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err_file)  # fmt: skip
        try:
            wait_for(lambda: proc.poll() is not None or c.get("/devices/cam-term").status_code == 200, 90.0, 0.1)
            assert proc.poll() is None, log.read_text()[-2000:]
            assert c.get("/devices/cam-term").status_code == 200, "no lease within 90 s"
            time.sleep(after_s)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            rc = proc.wait(timeout=30)
            closed_s = time.monotonic() - t0
        finally:
            end_process(proc)
        gone = c.get("/devices/cam-term").status_code
    err = log.read_text()
    assert rc == 143 and "terminated (SIGTERM)" in err, (rc, err[-2000:])
    assert gone == 404, f"the lease outlived its device: {err[-3000:]}"
    assert closed_s < 15.0, closed_s
