"""Calibrating a device profile to whole runs (dapdee.calibration): the monotone fit against the
min-max formula of isotonic regression, chain exactness, the single-tensor cuts of small DAGs
worked out by hand, and a real model's measured, calibrated profile."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dapdee.calibration import (
    MonotoneFit,
    calibrated_timings,
    checkpoints,
    fit_monotone,
    part_sums,
    single_tensor_cuts,
)
from dapdee.costgraph import CostGraph, Exit, InputSpec, Node
from dapdee.device.profile import measure_device_profile
from dapdee.models import load_model


def _graph(edges: dict[str, tuple[str, ...]], exits: dict[str, str], ms: dict[str, float] | None = None) -> CostGraph:
    nodes = tuple(Node(n, "conv2d", ins, 100, device_ms=(ms or {}).get(n, 1.0)) for n, ins in edges.items())
    return CostGraph(
        "g", InputSpec("x", (1, 3, 8, 8), "uint8", 192), nodes, tuple(Exit(e, n) for e, n in exits.items())
    )


def _isotonic_oracle(ys: list[float]) -> list[float]:
    """The least-squares non-decreasing fit by the min-max formula: f_i = max_{j<=i} min_{k>=i}
    mean(y_j..y_k) (no pooling loop)."""
    n = len(ys)
    return [max(min(sum(ys[j : k + 1]) / (k + 1 - j) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]


@pytest.mark.parametrize("seed", range(40))
def test_fit_matches_isotonic_regression(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    xs = sorted(rng.sample(range(1, 100), n))
    ys = [rng.uniform(0, 50) for _ in range(n)]
    fit = fit_monotone(list(zip(xs, ys, strict=True)))
    want = _isotonic_oracle(ys)
    # each point's fitted value is its block's mean, which F passes through at the block's mean S:
    # compare F on the pooled values through the block structure
    got_levels = [t for _, t in fit.knots]
    assert got_levels == sorted(got_levels)
    assert sorted({round(v, 9) for v in want}) == sorted({round(v, 9) for v in got_levels})
    assert fit(0.0) == 0.0 and all(fit(a) <= fit(b) + 1e-12 for a, b in zip(range(120), range(1, 121), strict=True))


@pytest.mark.parametrize("seed", range(30))
def test_points_of_one_s_get_one_value_the_least_squares_one(seed: int) -> None:
    """Repeated S values (a 0 ms node between two checkpoints gives two measurements of one S):
    the fit is the least-squares non-decreasing *function*, one value per S, by the min-max
    formula over the groups of equal S (the mean over groups j..k weighs each point once).
    It used to keep each point apart, sorted by T: a jump at that S, twice the error."""
    rng = random.Random(1000 + seed)
    xs = [rng.randint(1, 6) for _ in range(rng.randint(2, 12))]
    ys = [rng.uniform(0, 50) for _ in xs]
    fit = fit_monotone(list(zip(xs, ys, strict=True)))
    groups = [[y for x, y in zip(xs, ys, strict=True) if x == s] for s in sorted(set(xs))]

    def mean(j: int, k: int) -> float:
        pts = [y for g in groups[j : k + 1] for y in g]
        return sum(pts) / len(pts)

    n = len(groups)
    want = [max(min(mean(j, k) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]
    knot_s = [s for s, _ in fit.knots]
    assert all(a < b for a, b in zip(knot_s, knot_s[1:], strict=False)), fit.knots  # no jump
    assert sorted({round(v, 9) for v in want}) == sorted({round(t, 9) for _, t in fit.knots})


def test_fit_edge_cases() -> None:
    assert fit_monotone([])(7.0) == 7.0  # no points: identity
    one = fit_monotone([(10.0, 25.0)])  # one point: a line through the origin (scale only)
    assert one(4.0) == pytest.approx(10.0) and one(20.0) == pytest.approx(50.0)
    assert fit_monotone([(0.0, 5.0), (-1.0, 3.0)]).knots == ()  # S <= 0 carries no information
    f = MonotoneFit(((2.0, 10.0), (6.0, 12.0)))
    assert f(1.0) == pytest.approx(5.0) and f(4.0) == pytest.approx(11.0) and f(12.0) == pytest.approx(24.0)


def test_chain_parts_are_priced_at_the_fit() -> None:
    rng = random.Random(3)
    names = [f"n{i}" for i in range(12)]
    edges = {n: ((names[i - 1],) if i else ("x",)) for i, n in enumerate(names)}
    g = _graph(edges, {"final": names[-1]}, {n: rng.uniform(0.1, 3.0) for n in names})
    sums = part_sums(g)
    fit = fit_monotone([(sums[n], 2.0 * sums[n] + 5.0 + rng.uniform(0, 1)) for n in names[::3]])
    t = calibrated_timings(g, fit)
    acc = 0.0
    for n in names:
        acc += t[n]
        assert t[n] >= 0
        assert acc == pytest.approx(fit(sums[n]), rel=1e-9, abs=1e-9)  # every prefix at F(S)


def test_single_tensor_cuts_of_small_dags() -> None:
    # a -> (b, c) -> d = add(b, c) -> e; an exit head h off a; final at e
    edges = {"a": ("x",), "b": ("a",), "c": ("a",), "h": ("a",), "d": ("b", "c"), "e": ("d",)}
    g = _graph(edges, {"exit1": "h", "final": "e"})
    assert single_tensor_cuts(g) == ["a", "d", "e"]  # b, c: the other branch leaves; h is a head
    assert checkpoints(g) == ["a", "h", "d", "e"]  # plus every exit's node
    # the input read twice: no node before the join is a cut
    g2 = _graph({"a": ("x",), "b": ("x",), "d": ("a", "b")}, {"final": "d"})
    assert single_tensor_cuts(g2) == ["d"]
    names = [f"n{i}" for i in range(30)]
    chain = _graph({n: ((names[i - 1],) if i else ("x",)) for i, n in enumerate(names)}, {"final": names[-1]})
    kept = checkpoints(chain, limit=5)
    assert kept == ["n0", "n7", "n14", "n21", "n28", "n29"]  # 5 cuts evenly spaced, then the exit


def test_measured_profile_is_calibrated_to_whole_runs() -> None:
    torch.set_num_threads(1)
    loaded = load_model("zoo:resnet18?width=0.25")
    g = measure_device_profile(loaded, slowdown=1.0, repeats=2, runs=3, max_cuts=4)
    meta = g.meta["device"]
    knots = [tuple(k) for k in meta["calibration"]]
    points = meta["calibration_points"]
    assert len(points) == len(checkpoints(loaded.graph, 4)) and knots
    assert [s for s, _ in knots] == sorted(s for s, _ in knots)
    assert [t for _, t in knots] == sorted(t for _, t in knots)
    fit = MonotoneFit(tuple(knots))
    ms = {n.name: n.device_ms for n in g.nodes}
    assert all(v is not None and v >= 0 for v in ms.values())
    for node, s, _ in points:  # a measured part is priced near F at its isolated sum (approx. on branches)
        priced = sum(ms[u] or 0.0 for u in g.ancestors(node))
        assert priced == pytest.approx(fit(s), rel=0.25)


def test_of_several_passes_the_profile_kept_is_the_median_one() -> None:
    """Three whole passes: the profile returned is one of them, the one whose node timings sum
    to the median of the three sums (a pass caught in a slow or fast spell of the host is not
    kept), with its calibration and every pass's sum in its meta; no pass at all is refused."""
    torch.set_num_threads(1)
    loaded = load_model("zoo:resnet18?width=0.25")
    g = measure_device_profile(loaded, slowdown=1.0, repeats=2, runs=3, max_cuts=4, passes=3, pause_s=0.0)
    meta = g.meta["device"]
    totals = meta["pass_totals_ms"]
    assert meta["passes"] == 3 and len(totals) == 3 and meta["calibration"]
    kept = sum(n.device_ms or 0.0 for n in g.nodes)
    assert kept == pytest.approx(sorted(totals)[1], abs=1e-3), (kept, totals)
    with pytest.raises(ValueError, match="passes"):
        measure_device_profile(loaded, slowdown=1.0, repeats=1, runs=1, passes=0)


def test_a_cached_device_profile_of_another_thread_count_is_measured_again(tmp_path: Path) -> None:
    """DESIGN: a cached profile is reused only at the slowdown and thread count asked for.
    `dapdee device run --threads N` sets torch's threads before asking for its profile; one
    cached at another count used to be taken as it was."""
    from dapdee.device.profile import device_profile

    loaded = load_model("zoo:resnet18?width=0.25")
    path = tmp_path / "device.json"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert device_profile(loaded, 1.0, path, repeats=1).meta["device"]["threads"] == 1
        torch.set_num_threads(2)
        again = device_profile(loaded, 1.0, path, repeats=1)
        assert again.meta["device"]["threads"] == 2
        assert json.loads(path.read_text())["meta"]["device"]["threads"] == 2  # replaced
        assert device_profile(loaded, 1.0, path, repeats=1).meta == again.meta  # and reused at 2
    finally:
        torch.set_num_threads(before)
