"""Load: concurrent device clients against one planner and two edge workers, all real
processes on 127.0.0.1 (bench/load.py). CI: 8 clients x 20 frames; `slow`: the target's
32 clients x 200 frames. Zero client errors, every frame answered, at most 1 % of frames
finished locally after an edge failure; p50/p99 and the workers' shares printed."""

from __future__ import annotations

import json

import pytest

from dapdee.bench.load import LoadConfig, run_load


def _check(cfg: LoadConfig) -> dict:
    res = run_load(cfg)
    d = res.as_dict()
    print("load result:", json.dumps(d, sort_keys=True))
    assert not res.client_errors, res.client_errors[:5]
    assert res.frames_lost == 0, d
    assert res.frames_answered == cfg.clients * cfg.frames
    assert sum(res.worker_requests.values()) > 0, "no frame reached an edge worker"
    # an edge request that failed under load is finished on the device (not lost); allow a
    # stray one on this shared 2-core machine, never a pattern
    assert res.where.get("fallback", 0) <= max(1, res.frames_expected // 100), res.fallback_reasons
    return d


def test_load_short() -> None:
    d = _check(LoadConfig(clients=8, frames=20, workers=2))
    assert d["where"].get("edge", 0) > 0


@pytest.mark.slow
def test_load_32_clients_x_200_frames() -> None:
    d = _check(LoadConfig(clients=32, frames=200, workers=2))
    # both workers take part (the planner sends each plan to the least-loaded live worker)
    assert all(n > 0 for n in d["worker_requests"].values()), d["worker_requests"]
