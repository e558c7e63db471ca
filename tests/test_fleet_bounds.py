"""The rebalance DP's LP bounds (dapdee.fleet.bounds) against brute force: no choice of one
option per device within a room adds more, in any component, than the bound says; and the
bounded DP gives the unbounded DP's answer with fewer states."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from dapdee.costgraph import CostGraph
from dapdee.fleet.bounds import hull_segments, suffix_bounds
from dapdee.fleet.rebalance import Demand, resolved_objective, solve
from dapdee.models import load_model
from dapdee.planning import PlanMap, PlanRequest

RHO_MAX = 0.9


def test_the_hull_keeps_the_rising_upper_envelope() -> None:
    pts = [(0.0, 0.0), (1.0, 3.0), (2.0, 4.0), (3.0, 4.5), (4.0, 4.0)]
    assert hull_segments(pts) == [(3.0, 1.0, 3.0), (1.0, 1.0, 1.0), (0.5, 1.0, 0.5)]
    # (1, 1) lies under the line from (0, 0) to (2, 4): one segment of slope 2
    assert hull_segments([(0.0, 0.0), (1.0, 1.0), (2.0, 4.0)]) == [(2.0, 2.0, 4.0)]
    assert hull_segments([(0.0, 5.0), (1.0, 2.0)]) == []  # nothing rises
    assert hull_segments([(0.0, -3.0)]) == []


def _random_chains(rng: random.Random, n: int) -> list[list[tuple[float, tuple[float, float, float]]]]:
    chains = []
    for _ in range(n):
        loads = [0.0, *sorted(rng.sample(range(1, 60), rng.randint(1, 4)))]
        chains.append(
            [(float(x), (float(rng.randint(0, 1)), rng.uniform(0, 10), -rng.uniform(50, 500))) for x in loads]
        )
    return chains


@pytest.mark.parametrize("seed", range(25))
def test_no_choice_within_the_room_beats_the_bound(seed: int) -> None:
    rng = random.Random(seed)
    chains = _random_chains(rng, rng.randint(1, 5))
    bounds = suffix_bounds(chains)
    assert len(bounds) == len(chains) + 1
    rooms = np.array([0.0, 5.0, 17.5, 40.0, 90.0, 250.0])
    for k in range(len(chains) + 1):
        upper = bounds[k].upper(rooms)
        best = np.full((len(rooms), 3), -np.inf)
        for combo in itertools.product(*chains[k:]):
            load = sum(o[0] for o in combo)
            value = [sum(o[1][c] for o in combo) for c in range(3)]
            fits = rooms >= load
            best[fits] = np.maximum(best[fits], value)
        assert np.all(best <= upper + 1e-9), (k, best, upper)
        # with room for every option the bound is each component's best sum: tight
        big = bounds[k].upper(np.array([1e6]))[0]
        for c in range(3):
            assert big[c] == pytest.approx(sum(max(o[1][c] for o in ch) for ch in chains[k:]))
    assert bounds[0].upper(np.array([-1.0]))[0, 0] == -np.inf  # no room even for Device-Only


def _resnet_fleet(n: int, seed: int) -> list[Demand]:
    """`n` cameras running a small ResNet-18 (86 nodes, four exits; timings from its flops) on
    varied uplinks, loads, budgets and frame rates: a staircase of thousands of states."""
    g = load_model("zoo:resnet18?width=0.25&in_channels=1").graph
    g = g.with_timings("device", {v.name: 1.2e-6 * (v.flops or 0) + 0.2 for v in g.nodes})
    g = g.with_timings("edge", {v.name: 4e-8 * (v.flops or 0) + 0.01 for v in g.nodes})
    raw = g.with_overheads(3.0, 2.0).to_dict()
    for e, acc in zip(raw["exits"], (0.81, 0.88, 0.926, 0.932), strict=True):
        e["accuracy"] = acc
    pm = PlanMap.build(CostGraph.from_dict(raw))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fps = rng.choice([5.0, 10.0, 15.0])
        req = PlanRequest(
            10 ** rng.uniform(-1, 1.7), rng.uniform(5, 60), rng.uniform(0, 0.5), 0.0,
            rng.uniform(100, 300), rng.choice([None, 0.9]), fps, "auto",
        )  # fmt: skip
        out.append(Demand(f"d{i}", fps, pm, req, resolved_objective(pm, req, RHO_MAX)))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_the_bounds_drop_states_and_keep_the_answer(seed: int) -> None:
    demands = _resnet_fleet(24, seed)
    for capacity in (100.0, 400.0, 1500.0):
        bounded = solve(demands, capacity, RHO_MAX)
        plain = solve(demands, capacity, RHO_MAX, bounded=False, max_states=10**6)
        assert bounded.exact and plain.exact
        assert bounded.value[:2] == plain.value[:2]
        assert bounded.value[2] == pytest.approx(plain.value[2], rel=1e-12)
        assert bounded.load <= RHO_MAX * capacity + 1e-9
        if capacity > 100.0:
            assert bounded.states * 2 < plain.states, (capacity, bounded.states, plain.states)
    # with room for every device's best option the first (bucketed) answer is the optimum, and the
    # bounds, rounded no further up than sums can reach, leave only its own path (one state);
    # rounding the accuracy bound up one quantum more kept 866-12,993 states here
    assert bounded.states <= 2, bounded.states
    # with room for most of them, the plain staircase outgrows a budget the bounded one fits in
    budget = plain.states - 1
    assert bounded.states <= budget
    assert solve(demands, 1500.0, RHO_MAX, max_states=budget).exact
    assert not solve(demands, 1500.0, RHO_MAX, bounded=False, max_states=budget).exact
