"""Confidence exits without a dataset: the exit rule at its threshold, calibration on synthetic logits
whose right thresholds are worked out by hand (calibration split and held-out test split), and the
shipped artifacts' recorded calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dapdee.costgraph import CostGraph
from dapdee.training import confidence as C

REPO = Path(__file__).resolve().parent.parent
CLASSES = 10


def test_first_confident_exit_rule() -> None:
    sure = torch.tensor([[10.0, 0, 0]])
    unsure = torch.tensor([[0.1, 0, 0]])
    logits = [torch.cat([sure, unsure, unsure]), torch.cat([unsure, sure, unsure]), torch.cat([unsure] * 3)]
    assert C.first_confident_exit(logits, [0.9, 0.9, None]).tolist() == [0, 1, 2]
    assert C.first_confident_exit(logits, [None, 0.9]).tolist() == [2, 1, 2]  # exit1 inactive
    by_name = dict(zip(["exit1", "exit2", "final"], logits, strict=True))
    assert C.first_confident_exit(by_name, {"exit2": 0.9}).tolist() == [2, 1, 2]
    assert C.is_confident(sure, 0.9) and not C.is_confident(unsure, 0.9) and not C.is_confident(sure, None)
    with pytest.raises(ValueError, match="thresholds"):
        C.first_confident_exit(logits, [0.5])


@pytest.mark.parametrize("t", [0.7, 0.9999])
def test_is_confident_rounds_the_threshold_as_the_run_time_rule_does(t: float) -> None:
    """A frame whose float32 confidence is float32(t), just below t itself: every use of the
    rule compares float32 tensors (the threshold rounded to float32) and lets it leave;
    `is_confident` compared in float64 and kept it."""
    logits = torch.tensor([[math.log(t), math.log(1 - t)]])
    assert C.confidence(logits).item() < t
    leaves = C.first_confident_exit([logits, logits], [t, None]).tolist() == [0]
    assert leaves and C.is_confident(logits, t)


def test_threshold_is_inclusive() -> None:
    """A frame whose max-softmax equals the threshold leaves. Equal logits give exactly 1/k:
    softmax([0, 0, 0, 0]) = 0.25 and softmax([0, 0]) = 0.5 in binary floating point."""
    four = torch.zeros(1, 4)
    assert C.confidence(four).item() == 0.25 and C.is_confident(four, 0.25)
    assert not C.is_confident(four, 0.2500001)
    assert C.first_confident_exit([four, four], [0.25, None]).tolist() == [0]
    costs = C.ExitCosts(_two_exit_graph())
    conf = torch.tensor([[0.5, 0.4], [0.9, 0.9]])
    correct = torch.ones(2, 2, dtype=torch.bool)
    st = C.policy_stats(conf, correct, [0.5, None], costs)
    assert st["exit_fraction"] == {"exit1": 0.5, "final": 0.5}


# ---- calibration with a known answer ---------------------------------------------------------------


def _two_exit_graph() -> CostGraph:
    """n0 (10 FLOPs) feeds the exit head h1 (2) and the backbone n1 (30). Leaving at exit1 costs
    A(exit1) = 10 + 2 = 12; leaving at final after evaluating exit1 costs 10 + 2 + 30 = 42;
    final alone (no confidence exit) 10 + 30 = 40."""

    def node(name: str, inputs: list[str], flops: int) -> dict:
        return {"name": name, "op": "op", "inputs": inputs, "out_bytes": 4, "flops": flops}

    return CostGraph.from_dict(
        {
            "model": "two-exit",
            "input": {"name": "x", "shape": [1, 4], "bytes": 16},
            "nodes": [node("n0", ["x"], 10), node("h1", ["n0"], 2), node("n1", ["n0"], 30)],
            "exits": [{"name": "exit1", "node": "h1"}, {"name": "final", "node": "n1"}],
        }
    )


def _logits(conf: float, right: bool, label: int) -> torch.Tensor:
    """10-class logits whose max-softmax is `conf`: [a, 0, ..., 0] has max e^a / (e^a + 9), so
    a = ln(9·conf / (1 − conf)); the top class is `label` when `right`, else the next class."""
    row = torch.zeros(CLASSES)
    row[label if right else (label + 1) % CLASSES] = math.log(9 * conf / (1 - conf))
    return row


def _split(groups: list[tuple[int, float, bool, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(conf [2, N], correct [2, N]) from groups of (frames, exit1 confidence, exit1 right, final
    right); computed through `confidence` and argmax, as calibrate_artifact does on real logits."""
    ex1, fin, labels = [], [], []
    for count, conf, ex1_right, final_right in groups:
        for i in range(count):
            y = i % CLASSES
            ex1.append(_logits(conf, ex1_right, y))
            fin.append(_logits(0.9, final_right, y))
            labels.append(y)
    y = torch.tensor(labels)
    logits = [torch.stack(ex1), torch.stack(fin)]
    return (
        torch.stack([C.confidence(lg) for lg in logits]),
        torch.stack([lg.argmax(1) == y for lg in logits]),
    )


# calibration split, 100 frames, final always right:
#   60 with exit1 confidence 0.905 (right), 20 at 0.705 (wrong), 20 at 0.505 (right)
# threshold t <= 0.505: all 100 leave, 20 wrong: loss 0.2; 0.505 < t <= 0.705: 80 leave, loss 0.2;
# 0.705 < t <= 0.905: the 60 right ones leave, loss 0; t > 0.905: nobody leaves.
# With a bound of 0.05, the answer is t in (0.705, 0.905]: 60 % leave at 12 FLOPs, 40 % at 42:
# mean 0.6·12 + 0.4·42 = 24 FLOPs, saved 1 − 24/40 = 0.4.
CALIB = [(60, 0.905, True, True), (20, 0.705, False, True), (20, 0.505, True, True)]
# held-out test split, 200 frames:
#   100 at 0.95 right, 4 at 0.95 wrong (final right), 60 at 0.6 wrong (final right),
#   36 at 0.3 wrong with final wrong too.
# With t in (0.705, 0.905]: 104 leave at exit1, 100 right; the rest go to final, 60 right.
# accuracy 160/200 = 0.80, final alone 164/200 = 0.82: loss 0.02 <= 0.05. exit1 104/200 = 0.52;
# mean FLOPs 0.52·12 + 0.48·42 = 26.4, saved 1 − 26.4/40 = 0.34.
TEST = [(100, 0.95, True, True), (4, 0.95, False, True), (60, 0.6, False, True), (36, 0.3, False, False)]


def test_calibration_known_answer_and_held_out_loss() -> None:
    costs = C.ExitCosts(_two_exit_graph())
    assert costs.per_exit([True]) == [12, 42] and costs.final_flops == 40
    calib, test = _split(CALIB), _split(TEST)
    ts = C.calibrate_thresholds(*calib, costs, max_loss=0.05, z=0.0)
    assert len(ts) == 2 and ts[1] is None and ts[0] is not None and 0.705 < ts[0] <= 0.905, ts
    cal = C.policy_stats(*calib, ts, costs)
    assert cal["accuracy_loss"] == 0.0 and cal["exit_fraction"] == {"exit1": 0.6, "final": 0.4}
    assert cal["mean_flops"] == pytest.approx(24.0) and cal["flops_saved"] == pytest.approx(0.4)
    held = C.policy_stats(*test, ts, costs)
    assert held["final_accuracy"] == pytest.approx(0.82) and held["accuracy"] == pytest.approx(0.80)
    assert held["accuracy_loss"] == pytest.approx(0.02) and held["accuracy_loss"] <= 0.05
    assert held["exit_fraction"] == {"exit1": 0.52, "final": 0.48}
    assert held["flops_saved"] == pytest.approx(0.34)
    # a bound of 0 leaves the same answer (its loss is 0); no early exit can answer at a bound < 0
    assert 0.705 < C.calibrate_thresholds(*calib, costs, 0.0, z=0.0)[0] <= 0.905


# calibration split where the margin decides: 60 at 0.905 right, 2 at 0.705 wrong, 38 at 0.705 right.
# t <= 0.705 lets all 100 leave: loss 2/100 = 0.02; the paired per-frame loss is 1 on 2 frames and 0
# on 98, sample variance (2·0.98² + 98·0.02²)/99 = 1.96/99, stderr sqrt(1.96/99)/10 = 0.014071.
# z = 0: 0.02 <= 0.05, so t <= 0.705 (everyone leaves: the most FLOPs saved).
# z = 2.5: 0.02 + 2.5·0.014071 = 0.05518 > 0.05, so t stays in (0.705, 0.905].
MARGIN = [(60, 0.905, True, True), (2, 0.705, False, True), (38, 0.705, True, True)]


def test_calibration_margin_of_z_standard_errors() -> None:
    costs = C.ExitCosts(_two_exit_graph())
    calib = _split(MARGIN)
    loose = C.calibrate_thresholds(*calib, costs, 0.05, z=0.0)
    assert loose[0] is not None and loose[0] <= 0.705, loose
    st = C.policy_stats(*calib, loose, costs)
    assert st["accuracy_loss"] == pytest.approx(0.02)
    assert st["loss_stderr"] == pytest.approx(math.sqrt(1.96 / 99) / 10, rel=1e-9)
    strict = C.calibrate_thresholds(*calib, costs, 0.05, z=2.5)
    assert strict[0] is not None and 0.705 < strict[0] <= 0.905, strict


# ---- the shipped artifacts ------------------------------------------------------------------------------

MANIFESTS = sorted((REPO / "artifacts").glob("*/manifest.json"))


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.parent.name for p in MANIFESTS])
def test_shipped_artifacts_calibrated_within_bound(path: Path) -> None:
    m = json.loads(path.read_text())
    ce = m["confidence_exits"]
    bound = ce["max_accuracy_loss"]
    test = ce["test"]
    assert ce["within_bound_on_test"] is True
    assert test["accuracy_loss"] <= bound, (test["accuracy_loss"], bound)
    # the recorded loss is what its own accuracies say, on the whole test split
    assert test["accuracy_loss"] == pytest.approx(test["final_accuracy"] - test["accuracy"], abs=1e-9)
    assert test["n"] == m["splits"]["test"] and sum(test["exit_fraction"].values()) == pytest.approx(1.0)
    names = [e["name"] for e in m["exits"]]
    assert list(ce["thresholds"]) == names and ce["thresholds"][names[-1]] is None
    assert ce["calib"]["accuracy_loss"] + ce["z"] * ce["calib"]["loss_stderr"] <= bound + 1e-12


def test_artifacts_are_shipped() -> None:
    assert len(MANIFESTS) >= 4, MANIFESTS
