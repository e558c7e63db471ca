"""Profiler: per-node timings, slowdown, tier merge, FLOPs predictor."""

from __future__ import annotations

import pytest

from dapdee.cli import main as cli_main
from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.models import load_model
from dapdee.profiler import FlopsPredictor, merge_profiles, profile_model


@pytest.fixture(scope="module")
def resnet():
    return load_model("zoo:resnet18?width=0.25")


def test_profile_fills_tier_and_records_slowdown(resnet) -> None:
    dev = profile_model(resnet, "device", slowdown=10.0, threads=1, repeats=3, warmup=1)
    assert dev.has_timings("device") and not dev.has_timings("edge")
    assert all(n.device_ms > 0 for n in dev.nodes)
    assert dev.meta["device"]["slowdown"] == 10.0 and dev.meta["device"]["threads"] == 1
    edge = profile_model(resnet, "edge", threads=1, repeats=3, warmup=1)
    dev_sum = sum(n.device_ms for n in dev.nodes)
    edge_sum = sum(n.edge_ms for n in edge.nodes)
    assert 2.0 < dev_sum / edge_sum < 50.0  # K = 10 emulated device, with timing noise
    merged = merge_profiles(dev, edge)
    merged.require_timings()
    assert CostGraph.from_json(merged.to_json()) == merged


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
    assert cli_main(["profile", "zoo:alexnet?width=0.25", "--tier", "device", "--slowdown", "0.5"]) == 2


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
    measured = profile_model(resnet, "device", repeats=5, warmup=1)
    pred = FlopsPredictor.fit([measured], "device")
    err = pred.errors(measured)
    assert 0.0 <= err["node_median_rel_error"] < 10 and 0.0 <= err["sum_rel_error"] < 10
