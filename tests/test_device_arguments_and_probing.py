"""The device client's arguments and probing: a `--profile` that cannot hold the profile
and an empty `--source` are argument errors (exit 2, one line naming the option) before any work;
the default device tier names a thread count other than the default; a probe pair before any
round trip sample leaves the round trip out of the fixed per-request cost (it was counted twice
once the round trip was known); and a suspected change that a probe has already met is probed
again at the idle cadence, not every 0.2 s."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from dapdee.cli import build_parser
from dapdee.device.commands import settings_of
from dapdee.device.config import RuntimeConfig, default_tier
from dapdee.device.edge import EdgeLink, WorkerTrust
from dapdee.device.probe import LinkProber, Sensor
from dapdee.device.sensing import BandwidthEstimator, Sensing
from dapdee.netem import ShapedUplink
from dapdee.testing import serve_app_in_thread
from tests.device_stack import SPEC, ForwardingProxy, Stack

REPO = Path(__file__).resolve().parent.parent
DEVICE_ONLY = ["device", "run", "--device-only", "--model", SPEC, "--frames", "1", "--quiet", "--device-load", "0"]


def _device_run(*extra: str) -> subprocess.CompletedProcess[str]:
    """`dapdee device run --device-only` (one frame of the seeded test model) with `extra`
    arguments, in a process of its own (no DAPDEE_ settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "dapdee.cli", *DEVICE_ONLY, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess[str], option: str) -> str:
    """The one stderr line of a run refused as an argument error naming `option` (exit 2, no output)."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and option in err, err
    assert proc.stdout == "", proc.stdout
    return err


# ---- 1. --profile -------------------------------------------------------------------------------


def test_a_profile_path_that_cannot_hold_the_profile_is_an_argument_error(tmp_path: Path) -> None:
    """A directory, a path under a regular file and an empty path are refused before any work
    (no frame log written); a path under missing folders is made, and the profile written there
    is read (not written again) by the next run."""
    (tmp_path / "afile").write_text("not a folder")
    log = tmp_path / "frames.jsonl"
    for bad in (str(tmp_path), str(tmp_path / "afile" / "p.json"), ""):
        err = _one_line_error(_device_run("--profile", bad, "--log", str(log)), "--profile")
        assert not log.exists(), err
    profile = tmp_path / "new" / "folders" / "device.json"
    first = _device_run("--profile", str(profile))
    assert first.returncode == 0 and profile.is_file(), first.stderr[-2000:]
    written = profile.stat().st_mtime_ns
    second = _device_run("--profile", str(profile))
    assert second.returncode == 0, second.stderr[-2000:]
    assert profile.stat().st_mtime_ns == written  # read, not measured and written again


# ---- 2. --source "" -----------------------------------------------------------------------------


def test_an_empty_source_is_an_argument_error() -> None:
    """An empty --source has no meaning (random inputs are what leaving it out gives); it ran
    random frames and exited 0."""
    _one_line_error(_device_run("--source", ""), "--source")


# ---- 3. the default device tier -----------------------------------------------------------------


def test_the_default_tier_names_a_thread_count_other_than_the_default() -> None:
    """Default runs keep their names (published and committed profiles still match); another
    thread count is another device speed, so another profile."""
    assert default_tier(10.0) == default_tier(10.0, 1) == "device-k10"
    assert default_tier(2.5, 1) == "device-k2_5"
    assert default_tier(10.0, 2) == "device-k10-t2" and default_tier(2.5, 4) == "device-k2_5-t4"
    run = ["device", "run", "--planner", "http://127.0.0.1:9", "--model", SPEC]
    tier = lambda *extra: settings_of(build_parser().parse_args([*run, *extra])).planner.tier  # noqa: E731
    assert tier() == "device-k10" and tier("--threads", "1") == "device-k10"
    assert tier("--threads", "2") == "device-k10-t2"
    assert tier("--threads", "2", "--slowdown", "30") == "device-k30-t2"
    assert tier("--threads", "2", "--device-tier", "cam-a") == "cam-a"


# ---- 4a. a probe pair before any round trip -----------------------------------------------------


def test_a_pair_before_any_round_trip_leaves_the_round_trip_out_of_the_overhead() -> None:
    """A pair at 1 Mbit/s over a 20 ms round trip with 3 ms of fixed cost, seen before any round
    trip sample: the rate is taken, the overhead is not (it would hold the round trip, stated
    again on top of it once it is known); the next pair, with the round trip known, gives it."""
    s = Sensing(prior_mbps=5.0, fixed_load=0.0)
    assert s.observe_pair((1_000, 31.0), (11_000, 111.0)) == pytest.approx(1.0)
    s.rtt.observe(20.0)
    assert s.bandwidth.overhead_ms == 0.0 and s.request_rtt_ms == pytest.approx(20.0)
    assert s.observe_pair((1_000, 31.0), (11_000, 111.0)) == pytest.approx(1.0)
    assert s.bandwidth.overhead_ms == pytest.approx(3.0) and s.request_rtt_ms == pytest.approx(23.0)
    bw = BandwidthEstimator()
    assert bw.observe_pair((1_000, 31.0), (11_000, 111.0), rtt_ms=None) == pytest.approx(1.0)
    assert bw.overhead_ms == 0.0 and bw.pairs == 1


def test_a_probe_before_any_round_trip_does_not_count_it_twice(stack: Stack) -> None:
    """Real probes over an emulated 40 ms round trip until a pair gives a sample, before any
    round trip sample, then round trips: the round trip the device states is the measured one,
    not about twice it."""

    async def go() -> Sensing:
        sensing = Sensing(prior_mbps=20.0, fixed_load=0.0)
        link = EdgeLink(stack.graph, WorkerTrust(None, [stack.edge.url]), sensing, shaper=ShapedUplink(20.0, 40.0))
        prober = LinkProber(link, stack.graph, sensing)
        try:
            for _ in range(3):  # the first pair may pay for opening the connection: no sample
                if await prober.probe(stack.edge.url) is not None:
                    break
            await prober.measure_rtt(stack.edge.url, 3)
        finally:
            await link.aclose()
        return sensing

    sensing = asyncio.run(go())
    rtt = sensing.rtt.estimate_ms
    assert rtt >= 40.0 and sensing.bandwidth.pairs == 1, sensing.bandwidth.pairs
    assert sensing.request_rtt_ms < 1.5 * rtt, (sensing.request_rtt_ms, rtt, sensing.bandwidth.overhead_ms)


# ---- 4b. probes while a change is suspected -----------------------------------------------------


class FailingInfer(ForwardingProxy):
    """Forwards to a real worker; every infer answer becomes HTTP 500 (counted in `infers`)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.infers = 0

    async def answer(
        self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: httpx.Response
    ) -> tuple[int, dict[str, str], bytes]:
        if not scope["path"].endswith("/infer"):
            return await super().answer(scope, headers, body, response)
        self.infers += 1
        return 500, {"content-type": "application/json"}, b'{"error": "failing on purpose"}'


async def _tick_for(sensor: Sensor, seconds: float) -> None:
    """Tick `sensor` every 50 ms for `seconds`, as the runtime's background loop does."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await sensor.tick()
        await asyncio.sleep(0.05)


def test_a_suspected_change_a_probe_met_is_probed_at_the_idle_cadence(stack: Stack) -> None:
    """A step down is suspected (an upload timed out alone) and every probe fails, so the
    suspicion stays: after the first probe, the next waits for `probe_idle_s` (1 s) of quiet,
    instead of one every 0.2 s; a new suspicion is still probed at once."""
    proxy = FailingInfer(stack.edge.url)

    with serve_app_in_thread(proxy) as url:

        async def go() -> tuple[int, bool, int]:
            sensing = Sensing(prior_mbps=10.0, fixed_load=0.0)
            link = EdgeLink(stack.graph, WorkerTrust(None, [url]), sensing)
            sensor = Sensor(LinkProber(link, stack.graph, sensing), sensing, RuntimeConfig(), lambda: url)
            try:
                assert sensing.bandwidth.censor(100_000, 1000.0, 0.0) is not None  # 0.8 Mbit/s at most
                await _tick_for(sensor, 1.6)
                met, still = proxy.infers, sensing.bandwidth.suspect_change
                await _tick_for(sensor, 0.3)  # past the 0.2 s of quiet a new suspicion waits for
                before = proxy.infers
                assert sensing.bandwidth.censor(100_000, 4000.0, 0.0) is not None  # a further drop
                await _tick_for(sensor, 0.3)
                return met, still, proxy.infers - before
            finally:
                await sensor.aclose()
                await link.aclose()

        met, still, renewed = asyncio.run(go())
    assert still  # no probe settled it
    assert 1 <= met <= 2, met  # every 0.2 s this was 6 or more
    assert renewed >= 1, renewed
