"""The edge worker's planner registration at start-up, against real uvicorn servers on
127.0.0.1 and real torch models: a planner URL the SDK cannot use is refused by the settings
(and `dapdee serve edge` exits 2 naming it), a registration round that fails with an error the
planner calls do not expect is logged and retried rather than ending the task, and the worker
answers ready only once the registration task has profiled its models; at shutdown it tells the
planner it is leaving."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx
import pytest
import torch
from pydantic import SecretStr, ValidationError
from torch import nn

from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.config import Settings
from dapdee.models import LoadedModel, load_model
from dapdee.testing import ServiceProcess, free_port, serve_app_in_thread
from tests.conftest import SHARED_REDIS

EDGE_SPEC = "zoo:alexnet?width=0.25"
REGISTRATION_LOG = "dapdee.edge.registration"


class _Hold:
    """A gate for forward passes: `free` more passes go through, later ones wait until `opened`
    is set (`held` is set when one starts waiting)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free = 0
        self.opened = threading.Event()
        self.opened.set()
        self.held = threading.Event()

    def close_after(self, free: int) -> None:
        """Let `free` more passes through, then hold every later one."""
        with self.lock:
            self.free = free
            self.held.clear()
            self.opened.clear()


HOLD = _Hold()


def hold(x: torch.Tensor) -> torch.Tensor:
    """`x`, once `HOLD` lets this pass through (a traced leaf: it runs at inference time)."""
    with HOLD.lock:
        waits = not HOLD.opened.is_set() and HOLD.free <= 0
        HOLD.free -= 1
    if waits:
        HOLD.held.set()
        if not HOLD.opened.wait(60.0):
            raise RuntimeError("hold kept closed for 60 s")
    return x


torch.fx.wrap("hold")


class Held(nn.Module):
    """hold -> Linear(8, 4): one exit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(hold(x))


def held() -> nn.Module:
    """The factory of `tests.test_edge_registration:held`."""
    return Held()


@pytest.fixture(scope="module")
def alexnet() -> LoadedModel:
    return load_model(EDGE_SPEC)


def _unreachable_planner() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_a_planner_url_the_sdk_cannot_use_is_refused_at_start_up(capsys: Any) -> None:
    """`127.0.0.1:8080` (no scheme) made the registration task die at once, silently; now the
    settings refuse it naming the setting, and `dapdee serve edge` exits 2 before loading any
    model. A usable URL is kept as the SDK keeps it (no trailing slash); empty means none."""
    for bad in ("127.0.0.1:8080", "ftp://planner:8080", "http://user:pw@planner:8080"):
        with pytest.raises(ValidationError, match="planner_url"):
            Settings(planner_url=bad)
        with pytest.raises(ValidationError, match="public_url"):  # where devices reach it
            Settings(public_url=bad)
    assert Settings(planner_url="http://planner:8080/").planner_url == "http://planner:8080"
    assert Settings(planner_url="").planner_url is None
    from dapdee.cli import main

    assert main(["serve", "edge", "--planner", "127.0.0.1:8080", "--models", EDGE_SPEC, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "planner_url" in err and "127.0.0.1:8080" in err


def test_a_registering_worker_must_know_the_url_it_advertises(capsys: pytest.CaptureFixture[str]) -> None:
    """Port 0 is picked at bind time, after start-up, and a wildcard host is no address a device
    can reach: a worker with a planner used to register http://127.0.0.1:0 or
    http://0.0.0.0:PORT. Now either is refused at start-up (exit 2, naming the setting), a
    wildcard host is fine with a public URL, and a worker without a planner may use both."""
    with pytest.raises(ValidationError, match="port: 0"):
        Settings(planner_url="http://planner:8080", port=0)
    with pytest.raises(ValidationError, match="port: 0"):  # it also measures its request cost there
        Settings(planner_url="http://planner:8080", port=0, public_url="http://edge-1:8000")
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ValidationError, match="public_url: needed with host"):
            Settings(planner_url="http://planner:8080", host=host)
        assert Settings(planner_url="http://planner:8080", host=host, public_url="http://edge-1:8000").host == host
    assert Settings(port=0, host="0.0.0.0").port == 0  # nothing registered: nothing advertised
    from dapdee.cli import main

    assert main(["serve", "edge", "--planner", "http://127.0.0.1:8080", "--models", EDGE_SPEC, "--port", "0"]) == 2
    assert "edge worker settings: port: 0" in capsys.readouterr().err
    argv = ["serve", "edge", "--planner", "http://127.0.0.1:8080", "--models", EDGE_SPEC, "--batch-max", "0"]
    assert main(argv) == 2
    assert "batch_max (DAPDEE_EDGE_BATCH_MAX)" in capsys.readouterr().err


def test_a_round_failing_unexpectedly_is_logged_and_retried(
    alexnet: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker token the SDK refuses (a trailing newline, as a secret file often has) made
    opening the planner client raise RequestError, which no planner call expects: the task used
    to end there without a word and never heartbeat. Now each round logs the error with its
    traceback and is retried with back-off, and the worker keeps serving. (The settings refuse
    such a token at load now; it is set past them here to make every round fail unexpectedly.)"""
    settings = Settings(planner_url=_unreachable_planner(), profile=False, heartbeat_s=0.1)
    settings = settings.model_copy(update={"worker_token": SecretStr("wrk-token\n")})
    caplog.set_level(logging.WARNING, logger=REGISTRATION_LOG)
    app = create_app(settings, [alexnet])

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == REGISTRATION_LOG and r.levelno == logging.ERROR]

    with serve_app_in_thread(app) as url, httpx.Client(base_url=url) as c:
        deadline = time.monotonic() + 20
        while len(failures()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/v2/health/ready").status_code == 200
    records = failures()
    assert len(records) >= 3, [r.getMessage() for r in caplog.records]
    for r in records:
        assert "registration round failed" in r.getMessage() and r.exc_info is not None
        assert "token" in str(r.exc_info[1])


def test_ready_only_once_the_models_are_profiled() -> None:
    """DESIGN §10: with a planner configured, `/v2/health/ready` (and each model's ready route)
    answers true only once the registration task has profiled the models. The model's forward
    pass is held at its gate from the first profiling pass on (its warm-up at start-up goes
    through), so the worker is up but not profiled for as long as the test needs; the not-ready
    answer is 400, as OIP's health routes answer false."""
    model = load_model("tests.test_edge_registration:held", input_shape=(1, 8))
    settings = Settings(
        planner_url=_unreachable_planner(),
        profile_repeats=1,
        profile_warmup=0,
        request_samples=0,
        heartbeat_s=0.2,
        planner_timeout_s=0.5,
    )
    app = create_app(settings, [model])
    HOLD.close_after(1)  # the start-up warm-up pass
    try:
        with serve_app_in_thread(app) as url, httpx.Client(base_url=url) as c:
            try:  # opened before the server stops: its shutdown waits for the profiling thread
                assert HOLD.held.wait(30.0)  # profiling has started, and waits
                assert c.get("/v2/health/live").status_code == 200
                assert c.get("/v2/health/ready").status_code == 400
                assert c.get("/v2/models/held/ready").status_code == 400
                assert not app.state.worker.registration["profiled"]
            finally:
                HOLD.opened.set()
            deadline = time.monotonic() + 30
            while c.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get("/v2/health/ready").status_code == 200
            assert c.get("/v2/models/held/versions/1/ready").status_code == 200
            assert app.state.worker.registration["profiled"] == ["held"]
            assert app.state.worker.models["held"].graph.has_timings("edge")
    finally:
        HOLD.opened.set()


def test_an_idle_workers_first_heartbeat_states_no_load() -> None:
    """The worker's own measuring requests at start-up (its per-request cost bursts) run on its
    compute pool; they are not load: an idle worker's first heartbeat states about none (before,
    0.08-0.14, held by the planner for a whole heartbeat period)."""
    planner = ServiceProcess("planner", ["--redis-url", "none"], "/healthz")
    with planner.start(60):
        args = ["--models", EDGE_SPEC, "--threads", "1", "--profile-repeats", "3", "--planner", planner.url]
        args += ["--request-passes", "2"]
        edge = ServiceProcess("edge", args, "/v2/health/ready", {"DAPDEE_EDGE_HEARTBEAT_S": "30"})
        with edge.start(120):
            deadline = time.monotonic() + 60
            while (row := _worker_row(planner.url, edge.url)) is None and time.monotonic() < deadline:
                time.sleep(0.1)
    assert row is not None and row["inflight"] == 0, row
    assert row["load"] < 0.02, row


def _worker_row(planner: str, url: str) -> dict[str, Any] | None:
    rows = httpx.get(f"{planner}/workers", timeout=10).json()["workers"]
    return next((w for w in rows if w["url"] == url), None)


def test_a_stopping_worker_tells_the_planner_it_is_leaving(planner_prefix: str) -> None:
    """A worker stopped by SIGTERM (a rolling update's) stayed in the planner's plans until its
    last heartbeat's TTL ran out: devices were sent to a closed port for up to DAPDEE_WORKER_TTL_S
    (60 s here). Now its shutdown sends one last heartbeat listing no model, so once it has
    exited the planner it heartbeats to lists it serving nothing, so does a second replica on the
    same Redis within its refresh, and a device's next plan names no worker and its lease books
    none. Planners and worker are `dapdee serve` processes; the device is the SDK."""
    from dapdee.client import PlannerClient
    from dapdee.testing.registration import registered

    env = {"DAPDEE_WORKER_TTL_S": "60", "DAPDEE_REFRESH_S": "0.2", "DAPDEE_KEY_PREFIX": planner_prefix}
    planner = ServiceProcess("planner", ["--redis-url", SHARED_REDIS], "/readyz", env)
    replica = ServiceProcess("planner", ["--redis-url", SHARED_REDIS], "/readyz", env)
    with planner.start(60), replica.start(60):
        args = ["--models", EDGE_SPEC, "--threads", "1", "--profile-repeats", "2", "--planner", planner.url]
        args += ["--request-passes", "1"]
        edge_env = {"DAPDEE_EDGE_HEARTBEAT_S": "0.5", "DAPDEE_EDGE_REQUEST_SAMPLES": "5"}
        edge = ServiceProcess("edge", args, "/v2/health/ready", edge_env)
        with edge.start(120), PlannerClient(planner.url, timeout=30) as sdk:
            deadline = time.monotonic() + 60
            while (row := _worker_row(replica.url, edge.url)) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert row is not None and row["models"] == ["alexnet"], row
            names = [n["name"] for n in httpx.get(f"{planner.url}/models/alexnet", timeout=10).json()["nodes"]]
            sdk.put_profile("alexnet", "dev", "device", {n: 50.0 for n in names})  # slow: the edge pays off
            body = {"model": "alexnet", "device_tier": "dev", "bandwidth_mbps": 100.0, "rtt_ms": 5.0}
            body |= {"device_id": "cam-1", "frame_rate": 5.0}
            before = sdk.plan(body)
            assert before.edge_worker == edge.url and before.lease is not None
            assert before.lease.worker == edge.url
        # the worker has exited: well inside its heartbeat's 60 s
        row = _worker_row(planner.url, edge.url)
        assert row is not None and row["models"] == [], row
        deadline = time.monotonic() + 5
        while (row := _worker_row(replica.url, edge.url)) and row["models"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert row is not None and row["models"] == [], row
        for url in (planner.url, replica.url):
            with PlannerClient(url, timeout=30) as sdk:
                assert not registered(sdk, "alexnet", [edge.url])  # what benches wait for after a restart
                after = sdk.plan(body)
            assert after.edge_worker is None and after.lease is not None and after.lease.worker is None
