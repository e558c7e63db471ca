"""`dapdee up`: the planner and edge server threads stop on any start-up failure (profiling
included) and in order at the end even when one fails to stop; a --log that cannot be written
is an error before anything starts; the frames are the artifact's own dataset's. The servers
are real (uvicorn in threads), and so are their failures: no code of ours is patched."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dapdee import data as D
from dapdee.device import up
from dapdee.device.types import DeviceError
from dapdee.models import MANIFEST, WEIGHTS, LoadedModel, load_model, sha256_file
from dapdee.netem import parse_network
from dapdee.testing import ServerThread
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


@dataclass(frozen=True)
class Tiny:
    """The device's part of a stack: a small model (an artifact of its own) and its profile."""

    artifact: Path
    loaded: LoadedModel
    graph: Any


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from dapdee.device.profile import measure_device_profile

    art = write_artifact(tmp_path_factory.mktemp("tiny") / "art")
    loaded = load_model("", weights=art)
    return Tiny(art, loaded, measure_device_profile(loaded, 1.0, repeats=2, runs=2))


Servers = tuple[ServerThread, ServerThread, list[str]]  # planner, edge, the order their shutdowns began in


def not_a_planner(name: str, stops: list[str], release: threading.Event | None = None) -> Any:
    """An ASGI app that answers 404 to every request (no planner, no edge worker) and whose
    lifespan shutdown appends `name` to `stops`; given `release`, it then waits for it (60 s at
    most): a server that does not stop when told to."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            stops.append(name)
            if release is not None:
                await asyncio.to_thread(release.wait, 60)
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not here"})

    return app


@pytest.fixture
def stuck_edge() -> Iterator[Servers]:
    """(planner, edge, stops): two real servers; the edge's stop() fails, its shutdown running
    past the 0.5 s its stop() waits (it is let go and joined afterwards)."""
    stops: list[str] = []
    release = threading.Event()
    planner = ServerThread(not_a_planner("planner", stops), name="planner").start()
    edge = ServerThread(not_a_planner("edge", stops, release), name="edge", stop_timeout_s=0.5).start()
    try:
        yield planner, edge, stops
    finally:
        release.set()
        for server in (planner, edge):
            if server.thread.is_alive():
                server.stop()


def new_uvicorn_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("uvicorn-")]


# ---- stopping --------------------------------------------------------------------------------


def test_profiling_failure_stops_planner_and_edge(tiny: Tiny) -> None:
    before = set(threading.enumerate())
    serving: list[threading.Thread] = []

    def interrupted(*a: Any, **k: Any) -> Any:
        serving.extend(new_uvicorn_threads(before))
        raise KeyboardInterrupt  # Ctrl-C during 'device: profiling ...'

    opts = up.UpOptions(artifact=str(tiny.artifact), networks=("WiFi",), frames=1, slowdown=1.0, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        up._start_stack(opts, lambda *a: None, measure=interrupted)
    assert [t.name for t in serving] == ["uvicorn-planner", "uvicorn-edge"]  # started in this order
    assert not any(t.is_alive() for t in serving)


def test_a_failing_edge_stop_still_stops_the_planner_and_keeps_the_first_error(tiny: Tiny, stuck_edge: Servers) -> None:
    """Streaming fails (the planner's URL answers, but no planner does); stopping the edge then
    fails too: the planner is still stopped, after the edge, and the streaming's error is raised."""
    planner, edge, stops = stuck_edge
    st = up.Stack(planner, edge, "m", "", None, tiny.loaded, tiny.graph, "t")
    opts = up.UpOptions(networks=("WiFi",), frames=1, slowdown=1.0, quiet=True)
    with pytest.raises(DeviceError, match="cannot reach the planner"):
        up._run_networks(st, opts, [parse_network("WiFi")], None)
    assert stops == ["edge", "planner"]
    assert not planner.thread.is_alive()


def test_after_a_clean_run_a_failing_edge_stop_is_raised_after_the_planner_stops(
    tiny: Tiny, stuck_edge: Servers
) -> None:
    """A run that streams (the Device-Only baseline: it needs neither server) and ends cleanly,
    then the edge fails to stop: the planner is stopped, after the edge, and the edge's error
    is raised."""
    planner, edge, stops = stuck_edge
    st = up.Stack(planner, edge, "m", "", None, tiny.loaded, tiny.graph, "t")
    opts = up.UpOptions(networks=(), frames=2, slowdown=1.0, quiet=True)
    with pytest.raises(RuntimeError, match="still running"):
        up._run_networks(st, opts, [], None)
    assert stops == ["edge", "planner"]
    assert not planner.thread.is_alive()


# ---- --log --------------------------------------------------------------------------------------


def test_an_unwritable_log_fails_before_anything_starts(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing started: no server thread, and not the start-up's first line ('planner http://...')."""
    before = set(threading.enumerate())
    log = str(tmp_path / "missing" / "f.jsonl")
    opts = up.UpOptions(artifact=str(tiny.artifact), networks=("WiFi",), frames=1, slowdown=1.0, log=log)
    with pytest.raises(ValueError, match="--log .*missing"):
        up.run_up(opts)
    assert "planner" not in capsys.readouterr().err
    assert new_uvicorn_threads(before) == []


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
