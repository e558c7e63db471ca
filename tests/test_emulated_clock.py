"""The emulated device's own clock: `EmulatedCompute`'s `released_at` and the fleet benchmark's
`DeviceStage`, which hands a frame's first planned device part its release time, so the part
begins at the release or at the end of the previous part, whichever is later, however late the
shared event loop gets to it. Real model, real sleeps; the assertions are on the device's
timeline (exact) and on lower bounds of time slept (a loaded host only sleeps longer), and one
upper bound with a wide margin."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import pytest

from dapdee.bench.fleet_bench.devices import RELEASED_AT, DeviceStage
from dapdee.device.compute import BoundaryValues, EmulatedCompute, nodes_to_run
from dapdee.models import load_model

NODE_MS = 5.0  # each node's emulated device time


@pytest.fixture(scope="module")
def emulated() -> Iterator[EmulatedCompute]:
    loaded = load_model("zoo:resnet18?width=0.25&in_channels=1")
    graph = loaded.graph.with_timings("device", {v.name: NODE_MS for v in loaded.graph.nodes})
    yield EmulatedCompute(graph, BoundaryValues(loaded))


def _whole(emu: EmulatedCompute) -> tuple[dict[str, object], list[str]]:
    """The values given and the targets of a part that runs every node."""
    return {emu.graph.input.name: emu.values.x}, [emu.graph.nodes[-1].name]


def test_part_ms_is_the_scaled_sum_and_names_nodes_outside_the_partition(emulated: EmulatedCompute) -> None:
    given, targets = _whole(emulated)
    ran = nodes_to_run(emulated.graph, given, targets)
    assert len(ran) > 50 and emulated.part_ms(given, targets) == pytest.approx(NODE_MS * len(ran))
    with pytest.raises(ValueError, match="outside it"):
        emulated.part_ms(given, targets, allowed=set())


def test_a_part_released_earlier_ends_on_the_devices_clock(emulated: EmulatedCompute) -> None:
    given, targets = _whole(emulated)
    ms = emulated.part_ms(given, targets)

    async def go(released_ago_s: float | None) -> tuple[float, float, float]:
        t0 = time.monotonic()
        released = None if released_ago_s is None else t0 - released_ago_s
        done = await emulated.run(given, targets, released_at=released)
        return (time.monotonic() - t0) * 1000.0, done.ms, emulated.free_at - (released or t0)

    wall, part, booked = asyncio.run(go(None))  # no release known: it begins when called
    assert wall >= ms and part >= ms and booked >= ms / 1000.0
    emulated.free_at = -math.inf  # the device idle
    wall, part, booked = asyncio.run(go(0.25))
    assert part >= ms and booked == pytest.approx(ms / 1000.0)  # its emulated time from its release
    assert wall < ms - 100.0, f"slept {wall:.0f} ms of a {ms:.0f} ms part released 250 ms ago"
    emulated.free_at = -math.inf
    wall, part, _ = asyncio.run(go(10.0))  # released longer ago than it lasts: no sleep, never negative
    assert part >= 10_000.0 and wall < ms


def test_a_frames_first_part_begins_at_its_release_or_the_previous_end(emulated: EmulatedCompute) -> None:
    given, targets = _whole(emulated)
    ms = emulated.part_ms(given, targets)
    planned = set(nodes_to_run(emulated.graph, given, targets))  # what the runtime passes for a plan's part
    stage = DeviceStage(emulated, asyncio.Event())
    emulated.free_at = -math.inf

    async def frame(released: float | None, parts: list[set[str] | None]) -> list[float]:
        RELEASED_AT.set(released)
        ends = []
        for allowed in parts:
            await stage.run(given, targets, allowed)
            ends.append(emulated.free_at)
        return ends

    async def go() -> None:
        # released 0.2 s ago, the device idle: the planned part began then, and the device is booked
        # until release + ms; a second part of the same frame (a fallback after the edge) begins when called
        released = time.monotonic() - 0.2
        first, second = await asyncio.create_task(frame(released, [planned, None]))
        assert first == pytest.approx(released + ms / 1000.0, abs=1e-9)
        assert second > first + ms / 1000.0 - 1e-9
        # a frame released while the previous part still ran (on the device's clock) begins at its end
        booked = emulated.free_at
        (third,) = await asyncio.create_task(frame(booked - 0.1, [planned]))
        assert third == pytest.approx(booked + ms / 1000.0, abs=1e-9)
        # a frame whose plan ran nothing on the device (Edge-Only), finished by a fallback after the
        # edge failed: the fallback waited for the edge, not for the loop, and begins when called
        before = time.monotonic()
        (fourth,) = await asyncio.create_task(frame(before - 0.2, [None]))
        assert fourth >= before + ms / 1000.0
        # a part outside any released frame (no release known) begins when called
        before = time.monotonic()
        (fifth,) = await asyncio.create_task(frame(None, [planned]))
        assert fifth >= before + ms / 1000.0
        assert stage.active == 0 and stage.changed.is_set()

    asyncio.run(go())
