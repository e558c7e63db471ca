"""`dapdee up`: the planner and edge server threads stop on any start-up failure (profiling
included) and in order at the end even when one fails to stop; a --log that cannot be written
is an error before anything starts; the frames are the artifact's own dataset's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dapdee import data as D
from dapdee.device import up
from dapdee.models import MANIFEST, WEIGHTS, load_model, sha256_file
from tests.images import write_png

SPEC = "zoo:alexnet?width=0.0625&in_channels=1&num_classes=3"


def write_artifact(directory: Path, **manifest: Any) -> Path:
    """weights.safetensors + manifest.json of a seeded untrained model (extra manifest fields)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = load_model(SPEC)
    save_file({k: v.contiguous() for k, v in m.module.state_dict().items()}, str(directory / WEIGHTS))
    doc = {"model": SPEC, "name": "tinyalex", "input_shape": list(m.input_shape), **manifest}
    doc["weights_sha256"] = sha256_file(directory / WEIGHTS)
    (directory / MANIFEST).write_text(json.dumps(doc))
    return directory


class FakeServer:
    """A server whose stop() is recorded (and raises `error` when given)."""

    def __init__(self, name: str, stops: list[str], error: BaseException | None = None) -> None:
        self.name, self.stops, self.error, self.url = name, stops, error, f"http://{name}"

    def stop(self) -> None:
        self.stops.append(self.name)
        if self.error is not None:
            raise self.error


def fake_stack(edge_error: BaseException | None, stops: list[str]) -> up.Stack:
    edge = FakeServer("edge", stops, edge_error)
    return up.Stack(FakeServer("planner", stops), edge, "m", "", None, None, None, "t")


# ---- stopping --------------------------------------------------------------------------------


def test_profiling_failure_stops_planner_and_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dapdee.device.profile as profile
    import dapdee.testing as testing

    servers: list[Any] = []

    class Recorded(testing.ServerThread):
        def start(self, *a: Any, **k: Any) -> Any:
            servers.append(self)
            return super().start(*a, **k)

    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt  # Ctrl-C during 'device: profiling ...'

    monkeypatch.setattr(testing, "ServerThread", Recorded)
    monkeypatch.setattr(profile, "measure_device_profile", interrupted)
    art = write_artifact(tmp_path / "art")
    try:
        with pytest.raises(KeyboardInterrupt):
            up.run_up(up.UpOptions(artifact=str(art), networks=("WiFi",), frames=1, slowdown=1.0, quiet=True))
        assert [s.thread.name for s in servers] == ["uvicorn-planner", "uvicorn-edge"]
        assert not any(s.thread.is_alive() for s in servers)
    finally:
        for s in servers:
            if s.thread.is_alive():
                s.stop()


def test_a_failing_edge_stop_still_stops_the_planner_and_keeps_the_first_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stops: list[str] = []
    monkeypatch.setattr(up, "_start_stack", lambda opts, say: fake_stack(OSError("edge stuck"), stops))

    def boom(*a: Any) -> Any:
        raise RuntimeError("frames failed")

    monkeypatch.setattr(up, "_frames", boom)
    with pytest.raises(RuntimeError, match="frames failed"):
        up.run_up(up.UpOptions(networks=("WiFi",), quiet=True))
    assert stops == ["edge", "planner"]


def test_after_a_clean_run_a_failing_edge_stop_is_raised_after_the_planner_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stops: list[str] = []
    monkeypatch.setattr(up, "_start_stack", lambda opts, say: fake_stack(OSError("edge stuck"), stops))
    monkeypatch.setattr(up, "_frames", lambda loaded, n: ([], "no frames"))

    async def one_network(*a: Any) -> tuple[dict[str, Any], None, list[Any]]:
        return {}, None, []

    monkeypatch.setattr(up, "_one_network", one_network)
    with pytest.raises(OSError, match="edge stuck"):
        up.run_up(up.UpOptions(networks=("WiFi",), quiet=True))
    assert stops == ["edge", "planner"]


# ---- --log --------------------------------------------------------------------------------------


def test_an_unwritable_log_fails_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*a: Any) -> Any:
        raise AssertionError("the stack was started")

    monkeypatch.setattr(up, "_start_stack", started)
    with pytest.raises(ValueError, match="--log .*missing"):
        up.run_up(up.UpOptions(networks=("WiFi",), quiet=True, log=str(tmp_path / "missing" / "f.jsonl")))


def _up(art: Path) -> list[str]:
    return [sys.executable, "-m", "dapdee.cli", "up", "--artifact", str(art), "--slowdown", "1", "--quiet"]


def test_the_log_gets_every_record(tmp_path: Path) -> None:
    """`dapdee up --log`, for real: one line per frame of every network and of the Device-Only
    baseline."""
    whole = tmp_path / "whole.jsonl"
    cmd = [*_up(write_artifact(tmp_path / "art")), "--frames", "3", "--networks", "WiFi", "--log", str(whole)]
    subprocess.run(cmd, check=True, timeout=120)
    assert len([json.loads(line) for line in whole.read_text().splitlines()]) == 2 * 3


@pytest.mark.parametrize(("sig", "rc"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_keeps_the_lines_of_the_frames_it_finished(tmp_path: Path, sig: int, rc: int) -> None:
    """A run stopped while it streams, by Ctrl-C or SIGTERM (a container's stop), keeps the lines
    of the frames it finished and exits 130 / 143 (the lines were written only at the end: such
    a run left an empty file; SIGTERM killed it outright)."""
    cut = tmp_path / "cut.jsonl"
    # 50 frames/s: the stream would last minutes (the test set's 10,000 frames, on WiFi, then on the device)
    streaming = ["--frames", "100000", "--frame-rate", "50", "--networks", "WiFi", "--log", str(cut)]
    # both signals' default actions, as a terminal gives them: a test run in the background has
    # SIGINT ignored, and a child inherits that
    proc = subprocess.Popen(
        [*_up(write_artifact(tmp_path / "art")), *streaming],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while (not cut.exists() or cut.stat().st_size == 0) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(30) == rc
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in cut.read_text().splitlines()]
    assert 0 < len(lines) < 5000 and all("exit" in rec for rec in lines)


# ---- the artifact's dataset -------------------------------------------------------------------


def test_up_streams_the_artifacts_own_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    root = tmp_path / "shapes"
    for k, c in enumerate(("a", "b", "c")):
        for i in range(5):
            write_png(root / c / f"{i}.png", np.clip(rng.normal(40 + 80 * k, 10, (28, 28)), 0, 255).astype(np.uint8))
    ref = D.parse_dataset(f"folder:{root}")
    pre = D.default_preprocess(ref, (1, 1, 32, 32))
    art = write_artifact(tmp_path / "art", dataset=ref.text, preprocess=pre)
    loaded = load_model("", weights=art)
    frames, desc = up._frames(loaded, 3)
    images, labels = D.load_raw(ref, "test", 3)
    assert [f.label for f in frames] == labels.tolist() and str(root) in desc
    want = D.capture_frames(images, (1, 1, 32, 32), pre)
    assert all(torch.equal(f.x[0], x) for f, x in zip(frames, want, strict=True))


@pytest.mark.skipif(not (D.FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(), reason="no Fashion-MNIST")
def test_up_streams_fashion_mnist_for_an_artifact_without_a_dataset(tmp_path: Path) -> None:
    loaded = load_model("", weights=write_artifact(tmp_path / "art"))
    frames, desc = up._frames(loaded, 4)
    assert desc == "4 Fashion-MNIST test images"
    assert [f.label for f in frames] == D.load_raw("fashion-mnist", "test", 4)[1].tolist()


@pytest.mark.parametrize("command", [["up"], ["device", "run", "--planner", "http://127.0.0.1:1"]])
def test_a_bad_rtt_is_refused_when_the_arguments_are_read(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--rtt-ms -5` (or nan, inf) used to be refused only after `dapdee up` had started and
    profiled its stack; the argument parser refuses it now (exit 2, naming the option), and 0
    is a valid round trip."""
    from dapdee.cli import build_parser

    for bad in ("-5", "nan", "inf", "ten"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*command, "--rtt-ms", bad])
        assert exc.value.code == 2
        assert "--rtt-ms" in capsys.readouterr().err
    assert build_parser().parse_args([*command, "--rtt-ms", "0"]).rtt_ms == 0.0


# ---- the demo's edge worker prices its requests ------------------------------------------------------


def test_the_demos_edge_worker_measures_its_per_request_cost() -> None:
    """`dapdee up`'s edge worker measures its own per-request cost, as `dapdee serve edge` does,
    so the demo's plans price each edge request (cost model v2) instead of charging 0 ms: the
    edge profile the planner holds states `edge_request_ms` > 0."""
    import httpx

    from dapdee.testing import wait_registered

    st = up._start_stack(up.UpOptions(quiet=True), lambda *a: None)
    try:
        edge_url = str(st.edge.url)
        wait_registered(st.planner.url, st.served, [edge_url], 120, st.token)
        auth = {"Authorization": f"Bearer {st.token}"}
        profiles = httpx.get(f"{st.planner.url}/models/{st.served}/profiles", headers=auth, timeout=10).json()
    finally:
        up._stop_servers(st.edge, st.planner)
    meta = profiles["profiles"]["edge"]["meta"]
    assert isinstance(meta.get("edge_request_ms"), float) and meta["edge_request_ms"] > 0, meta
