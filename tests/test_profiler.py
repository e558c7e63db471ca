"""Profiler: per-node timings, slowdown, tier merge, FLOPs predictor."""

from __future__ import annotations

import pytest

from dapdee.cli import main as cli_main
from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.models import load_model
from dapdee.profiler import (
    FlopsPredictor,
    ProfileCacheError,
    load_or_measure,
    merge_profiles,
    profile_model,
    read_cached_profile,
)


@pytest.fixture(scope="module")
def resnet():
    return load_model("zoo:resnet18?width=0.25")


def test_profile_fills_tier_and_records_slowdown(resnet) -> None:
    dev = profile_model(resnet, "device", slowdown=10.0, threads=1, repeats=3, warmup=1)
    assert dev.has_timings("device") and not dev.has_timings("edge")
    assert all(n.device_ms > 0 for n in dev.nodes)
    assert dev.meta["device"]["slowdown"] == 10.0 and dev.meta["device"]["threads"] == 1
    assert dev.meta["device"]["repeats"] == 3 and dev.meta["device"]["warmup"] == 1
    edge = profile_model(resnet, "edge", threads=1, repeats=3, warmup=1)
    assert edge.has_timings("edge") and edge.meta["edge"]["slowdown"] == 1.0
    merged = merge_profiles(dev, edge)
    merged.require_timings()
    assert CostGraph.from_json(merged.to_json()) == merged
    # each tier's per-request cost comes from its own profile (the edge's used to be dropped)
    both = merge_profiles(dev.with_overheads(2.5, 9.0), edge.with_overheads(8.0, 1.25))
    assert (both.overheads.device_request_ms, both.overheads.edge_request_ms) == (2.5, 1.25)


def test_slowdown_multiplies_every_measurement(resnet) -> None:
    """Each median is multiplied by K: running one node through the executor costs well over 100 ns
    (several Python calls plus a torch dispatch; 1.6 us for the cheapest node here), so with K = 1e5
    every node is >= 10 ms, while without the factor these nodes measure 0.002-0.4 ms. A lower bound,
    not a wall-clock ratio: no machine, however loaded, makes a node run faster. (The cost graph caps
    timings at 1e7 ms, so K cannot be much larger.)"""
    g = profile_model(resnet, "device", slowdown=1e5, threads=1, repeats=3, warmup=1)
    assert all(n.device_ms >= 10.0 for n in g.nodes), min(n.device_ms for n in g.nodes)
    with pytest.raises(ValueError, match="slowdown"):
        profile_model(resnet, "device", slowdown=0.5, repeats=1, warmup=0)


def test_cached_profile_of_other_settings_is_measured_again(resnet, tmp_path) -> None:
    """A cache measured at slowdown 1 is used at slowdown 1, never published as slowdown 10:
    there it is measured again (even `strict`, which refuses only unusable files) and the file
    replaced; recorded threads are compared too."""
    path = tmp_path / "device.json"
    k1 = profile_model(resnet, "device", slowdown=1.0, threads=1, repeats=1, warmup=0)
    k1.save(str(path))
    measured: list[float] = []

    def measure(k: float) -> CostGraph:
        measured.append(k)
        return profile_model(resnet, "device", slowdown=k, threads=1, repeats=1, warmup=0)

    same = load_or_measure(resnet, "device", path, lambda: measure(1.0), strict=True, slowdown=1.0, threads=1)
    assert measured == [] and [n.device_ms for n in same.nodes] == [n.device_ms for n in k1.nodes]
    k10 = load_or_measure(resnet, "device", path, lambda: measure(10.0), strict=True, slowdown=10.0, threads=1)
    assert measured == [10.0] and k10.meta["device"]["slowdown"] == 10.0
    assert CostGraph.load(str(path)).meta["device"]["slowdown"] == 10.0
    with pytest.raises(ProfileCacheError, match="threads 1, not 2"):
        read_cached_profile(path, resnet.graph, "device", slowdown=10.0, threads=2)
    assert read_cached_profile(path, resnet.graph, "device").meta["device"]["slowdown"] == 10.0  # nothing asked


def test_merge_refuses_different_graphs(resnet, tmp_path) -> None:
    dev = profile_model(resnet, "device", repeats=1, warmup=0)
    other = load_model("zoo:resnet18?width=0.5")
    edge_other = profile_model(other, "edge", repeats=1, warmup=0)
    with pytest.raises(CostGraphError, match="different graphs"):
        merge_profiles(dev, edge_other)
    small = load_model("zoo:resnet18?width=0.25", input_shape=(1, 3, 28, 28))
    with pytest.raises(CostGraphError, match="different input shapes"):
        merge_profiles(dev, profile_model(small, "edge", repeats=1, warmup=0))
    alex = profile_model(load_model("zoo:alexnet?width=0.25"), "edge", repeats=1, warmup=0)
    with pytest.raises(CostGraphError, match="different models"):
        merge_profiles(dev, alex)
    # through the CLI: exit code 2 and a one-line message
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    dev.save(str(a))
    alex.save(str(b))
    assert cli_main(["profile", "--merge", str(a), str(b)]) == 2


def test_profile_cli(tmp_path, capsys) -> None:
    out = tmp_path / "p.json"
    assert (
        cli_main(
            [
                "profile",
                "zoo:alexnet?width=0.25",
                "--tier",
                "device",
                "--slowdown",
                "4",
                "--repeats",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    g = CostGraph.load(str(out))
    assert g.has_timings("device") and g.meta["device"]["slowdown"] == 4.0
    assert cli_main(["profile", "zoo:alexnet?width=0.25"]) == 2
    assert "--tier" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # refused by the option's type, before any model loads
        cli_main(["profile", "zoo:alexnet?width=0.25", "--tier", "device", "--slowdown", "0.5"])
    assert exc.value.code == 2 and "--slowdown" in capsys.readouterr().err


def test_flops_predictor_recovers_linear_costs_and_transfers() -> None:
    """On timings that are exactly linear in FLOPs per op type, a fit on one model predicts
    another model's nodes exactly (the measured error on real timings is in bench/profile_additivity.py)."""
    rate = {"conv2d": (2e-8, 0.01), "linear": (5e-8, 0.004)}

    def synth(g):
        return g.with_timings(
            "device",
            {n.name: rate.get(n.op, (1e-9, 0.002))[0] * n.flops + rate.get(n.op, (1e-9, 0.002))[1] for n in g.nodes},
        )

    train = synth(load_model("zoo:resnet18?width=0.25").graph)
    test = synth(load_model("zoo:vgg16?width=0.25").graph)
    pred = FlopsPredictor.fit([train], "device")
    a, b = pred.coef["conv2d"]
    assert a == pytest.approx(2e-8, rel=1e-6) and b == pytest.approx(0.01, rel=1e-6)
    err = pred.errors(test)
    assert err["node_median_rel_error"] < 1e-6
    assert err["sum_rel_error"] < 0.01  # op types unseen in training (max-pool) use the global fit
    assert set(pred.predict(test)) == {n.name for n in test.nodes}


def test_flops_predictor_on_measured_profile(resnet) -> None:
    """On real (noisy) timings, properties that hold whatever the noise: a least-squares line with an
    intercept has residuals summing to zero, so per op type fitted in-sample (a, b > 0: not clamped,
    several distinct FLOP counts) the predicted sum equals the measured sum; and `errors` reports
    the median relative node error and the relative error of the total, recomputed here."""
    measured = profile_model(resnet, "device", repeats=5, warmup=1)
    pred = FlopsPredictor.fit([measured], "device")
    p = pred.predict(measured)
    checked = 0
    for op, (a, b) in pred.coef.items():
        nodes = [n for n in measured.nodes if n.op == op]
        if a > 0 and b > 0 and len({n.flops for n in nodes}) > 1:
            assert sum(p[n.name] for n in nodes) == pytest.approx(sum(n.device_ms for n in nodes), rel=1e-6), op
            checked += 1
    assert checked >= 1, pred.coef
    err = pred.errors(measured)
    rel = sorted(abs(p[n.name] - n.device_ms) / n.device_ms for n in measured.nodes)
    mid = len(rel) // 2
    median = rel[mid] if len(rel) % 2 else (rel[mid - 1] + rel[mid]) / 2
    assert err["node_median_rel_error"] == pytest.approx(median, rel=1e-12)
    total = sum(n.device_ms for n in measured.nodes)
    assert err["sum_rel_error"] == pytest.approx(abs(sum(p.values()) - total) / total, rel=1e-9, abs=1e-15)
