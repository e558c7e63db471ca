"""Joint exit training, artifacts, eval, resume and confidence exits on a tiny real run (the
dataset-free confidence tests are in tests/test_calibration.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dapdee import data as D
from dapdee.cli import main
from dapdee.models import WEIGHTS, ModelError, build_module, load_model, parse_spec, read_manifest
from dapdee.training import confidence as C
from dapdee.training.train import TrainConfig, default_exit_weights, evaluate, lr_at, predict_logits, train

pytestmark = pytest.mark.skipif(
    not (D.FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)

SPEC = "zoo:alexnet?width=0.125&in_channels=1"


def tiny_config(out: Path, **kw: Any) -> TrainConfig:
    base = dict(model=SPEC, dataset="fashion-mnist", out=str(out), epochs=2, batch_size=32, lr=0.05, limit=400)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("art") / "tiny"
    train(tiny_config(out, name="tiny-alexnet"), progress=False, log=lambda s: None)
    return out


def test_manifest_contents(artifact: Path) -> None:
    m = read_manifest(artifact)
    for key in (
        "name", "model", "input_shape", "preprocess", "exits", "dataset", "splits",
        "training", "epochs", "weights_sha256", "wall_time_s",
    ):  # fmt: skip
        assert key in m, key
    assert m["name"] == "tiny-alexnet" and m["model"] == SPEC and m["input_shape"] == [1, 1, 32, 32]
    assert [e["name"] for e in m["exits"]] == ["exit1", "exit2", "exit3", "final"]
    assert all(0 <= e["accuracy"] <= 1 for e in m["exits"])
    assert m["splits"] == {**m["splits"], "train": 400, "calib": 400, "test": 400}
    assert m["preprocess"]["resize"] == "pad" and m["training"]["exit_weights"] == [0.25, 0.5, 0.75, 1.0]
    assert not (artifact / "checkpoint").exists()
    # training loss goes down epoch over epoch; the final exit learns something
    assert m["history"][1]["loss"] < m["history"][0]["loss"]
    assert m["history"][1]["train_accuracy"]["final"] > 0.3


def test_roundtrip_same_logits_and_graph_accuracy(artifact: Path) -> None:
    from safetensors.torch import load_file

    m = read_manifest(artifact)
    loaded = load_model(SPEC, weights=artifact)
    assert loaded.name == "tiny-alexnet" and loaded.input_shape == (1, 1, 32, 32)
    # graph / profile read exit accuracies from the manifest
    assert [e.accuracy for e in loaded.graph.exits] == [e["accuracy"] for e in m["exits"]]
    module = build_module(parse_spec(SPEC))
    module.load_state_dict(load_file(str(artifact / WEIGHTS)))
    x, y = D.load_split("fashion-mnist", "test", (1, 1, 32, 32), m["preprocess"], limit=400)
    with torch.inference_mode():
        direct = module.eval()(x)
    # the graph takes the raw uint8 frame; its first node normalises it exactly as training did
    assert loaded.graph.input.dtype == "uint8" and loaded.graph.input.bytes == 32 * 32
    assert loaded.graph.nodes[0].name == "frame" and loaded.graph.nodes[0].out_bytes == 4 * 32 * 32
    images, _ = D.load_raw("fashion-mnist", "test", 400)
    frames = D.capture_frames(images, (1, 1, 32, 32), m["preprocess"])
    assert frames.dtype == torch.uint8
    for i, e in enumerate(loaded.graph.exits):
        got = loaded.run_exit(frames, e.name)
        assert torch.allclose(got, direct[i], atol=1e-5)
        assert int((got.argmax(1) == y).sum()) / 400 == pytest.approx(m["exits"][i]["accuracy"], abs=2 / 400)


def test_eval_agrees_with_manifest(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(artifact)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 400 and res["agrees_with_manifest"] is True and res["max_abs_diff"] == 0
    m = read_manifest(artifact)
    assert [e["accuracy"] for e in res["exits"]] == [e["accuracy"] for e in m["exits"]]


def test_resume_matches_uninterrupted(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    logs: list[str] = []
    first = train(tiny_config(out, name="tiny-alexnet"), progress=False, stop_after=1, log=logs.append)
    assert first["stopped_after"] == 1 and (out / "checkpoint" / "state.json").is_file()
    assert not (out / WEIGHTS).exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    # a different config must not silently resume this checkpoint
    with pytest.raises(ValueError, match="different run.*lr"):
        train(tiny_config(out, name="tiny-alexnet", lr=0.1), progress=False, log=lambda s: None)
    final = train(tiny_config(out, name="tiny-alexnet"), progress=False, log=logs.append)
    assert any("resuming" in s and "after epoch 1/2" in s for s in logs)
    assert [h["epoch"] for h in final["history"]] == [1, 2]
    ref = read_manifest(artifact)
    assert final["weights_sha256"] == ref["weights_sha256"]  # bit-identical to the uninterrupted run
    assert final["exits"] == ref["exits"]
    with pytest.raises(ValueError, match="already holds a trained artifact"):
        train(tiny_config(out), progress=False, log=lambda s: None)


def _with_weights(artifact: Path, directory: Path, change: Any) -> Path:
    """A copy of `artifact` whose weights `change(state)` edited; the manifest's sha256 matches
    them (a re-exported artifact, not a corrupted file)."""
    from safetensors.torch import load_file, save_file

    from dapdee.models import MANIFEST, sha256_file

    shutil.copytree(artifact, directory)
    state = load_file(str(directory / WEIGHTS))
    change(state)
    save_file(state, str(directory / WEIGHTS))
    manifest = read_manifest(directory)
    manifest["weights_sha256"] = sha256_file(directory / WEIGHTS)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_weights_of_another_dtype_or_not_finite_are_refused_naming_the_tensor(artifact: Path, tmp_path: Path) -> None:
    """load_state_dict would cast float16 weights and take NaN ones without a word; loading
    names the tensor instead. The unchanged copy loads (the helper itself breaks nothing)."""
    first = next(iter(_float_weights(artifact)))

    def half(state: dict[str, torch.Tensor]) -> None:
        state[first] = state[first].half()

    def nan(state: dict[str, torch.Tensor]) -> None:
        state[first] = state[first].clone()
        state[first].view(-1)[0] = float("nan")

    load_model("", weights=_with_weights(artifact, tmp_path / "same", lambda state: None))
    with pytest.raises(ModelError, match=f"weight '{first}' is torch.float16, the model's is torch.float32"):
        load_model("", weights=_with_weights(artifact, tmp_path / "half", half))
    with pytest.raises(ModelError, match=f"weight '{first}' holds NaN or an infinity"):
        load_model("", weights=_with_weights(artifact, tmp_path / "nan", nan))


def _float_weights(artifact: Path) -> dict[str, torch.Tensor]:
    """The floating tensors of an artifact's weights, by name."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(artifact / WEIGHTS)).items() if v.is_floating_point()}


class _DropoutNet(torch.nn.Module):
    """A tiny classifier with dropout: its training draws from torch's global random state."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(torch.relu(self.conv(x))), 1)))


def dropout_net() -> torch.nn.Module:
    return _DropoutNet()


def test_a_resumed_run_of_a_model_with_dropout_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    """The checkpoint keeps torch's random state, so epoch 2's dropout masks are the ones the
    uninterrupted run drew (before, the resume re-seeded: other masks, other weights)."""
    cfg = {"model": "tests.test_training:dropout_net", "limit": 200, "name": "tiny-dropout"}
    whole = train(tiny_config(tmp_path / "whole", **cfg), progress=False, log=lambda s: None)
    train(tiny_config(tmp_path / "cut", **cfg), progress=False, stop_after=1, log=lambda s: None)
    resumed = train(tiny_config(tmp_path / "cut", **cfg), progress=False, log=lambda s: None)
    assert resumed["history"] == whole["history"]
    assert resumed["weights_sha256"] == whole["weights_sha256"]


@pytest.mark.parametrize(
    ("text", "why"),
    [("[]", "expected an object, got list"), ("null", "got NoneType"), ('{"epoch": 1}', "history"),
     ('{"epoch": "x", "history": [], "wall_time_s": 1}', "epoch"),
     ('{"epoch": 1, "history": [], "wall_time_s": 1, "config": null}', "config"),
     ('{"epoch": 1, "history": [], "wall_time_s": 1' + "0" * 400 + ', "config": {}}', "wall_time_s"),
     ("[" * 100_000, "maximum recursion")],
)  # fmt: skip
def test_a_checkpoint_state_json_of_the_wrong_shape_is_refused_naming_it(tmp_path: Path, text: str, why: str) -> None:
    out = tmp_path / "run"
    train(tiny_config(out, limit=100, epochs=2), progress=False, stop_after=1, log=lambda s: None)
    (out / "checkpoint" / "state.json").write_text(text)
    with pytest.raises(ValueError, match=f"unreadable state.json \\(.*{why}.*\\); delete the directory"):
        train(tiny_config(out, limit=100, epochs=2), progress=False, log=lambda s: None)


def test_bad_inputs(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="trained for"):
        load_model("zoo:alexnet?width=0.25&in_channels=1", weights=artifact)
    other = tmp_path / "other-width"
    shutil.copytree(artifact, other)
    m = read_manifest(other)
    m["model"] = "zoo:alexnet?width=0.25&in_channels=1"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="does not fit model"):
        load_model("", weights=other)
    with pytest.raises(ValueError, match="4 exits, got 2"):
        train(tiny_config(tmp_path / "w", exit_weights=[1.0, 1.0]), progress=False, log=lambda s: None)
    with pytest.raises(D.DataError, match="not found"):
        train(
            tiny_config(tmp_path / "d", dataset=f"cifar10:{tmp_path}/none"),
            progress=False,
            log=lambda s: None,
        )
    with pytest.raises(ModelError, match="unknown zoo model"):
        train(tiny_config(tmp_path / "m", model="zoo:lenet"), progress=False, log=lambda s: None)
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_schedule_and_default_weights() -> None:
    assert default_exit_weights(4) == [0.25, 0.5, 0.75, 1.0]
    lrs = [lr_at(s, 1000, 0.1) for s in range(1000)]
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < 1e-3 and lrs[0] < lrs[49]


# ---- confidence exits ------------------------------------------------------------------------


def test_exit_costs_are_ancestor_unions(artifact: Path) -> None:
    g = load_model("", weights=artifact).graph
    costs = C.ExitCosts(g)
    flops = {n.name: n.flops for n in g.nodes}
    anc = [set(g.ancestors(e.node)) for e in g.exits]
    assert costs.final_flops == sum(flops[v] for v in anc[-1])
    all_on = costs.per_exit([True, True, True])
    assert all_on[1] == sum(flops[v] for v in anc[0] | anc[1])
    assert all_on == sorted(all_on) and all_on[-1] > costs.final_flops  # heads cost extra
    assert costs.per_exit([False, True, False])[1] == sum(flops[v] for v in anc[1])


def test_calibrate_command_writes_manifest(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "cal"
    shutil.copytree(artifact, art)
    assert main(["calibrate", str(art), "--max-accuracy-loss", "0.05"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rule"] == "max_softmax" and set(rep["thresholds"]) == {"exit1", "exit2", "exit3", "final"}
    assert rep["thresholds"]["final"] is None
    assert rep["calib"]["accuracy_loss"] + 2.5 * rep["calib"]["loss_stderr"] <= 0.05 + 1e-9
    assert sum(rep["test"]["exit_fraction"].values()) == pytest.approx(1.0)
    assert 0 <= rep["test"]["flops_saved"] < 1
    # the held-out numbers, recomputed from the test split's logits through the run-time rule
    # (first_confident_exit on logits, not policy_stats on confidences)
    loaded = load_model("", weights=art)
    m = read_manifest(art)
    logits, labels = predict_logits(loaded.module, "fashion-mnist", "test", loaded.input_shape, m["preprocess"], 400)
    leave = C.first_confident_exit(logits, [rep["thresholds"][e] for e in rep["thresholds"]])
    right = torch.stack([lg.argmax(1) == labels for lg in logits])
    accuracy = right.gather(0, leave[None])[0].double().mean().item()
    loss = right[-1].double().mean().item() - accuracy
    assert rep["test"]["n"] == 400 and rep["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert rep["test"]["accuracy_loss"] == pytest.approx(loss, abs=1e-12)
    assert rep["within_bound_on_test"] is (loss <= 0.05)
    m = read_manifest(art)
    assert m["confidence_exits"]["thresholds"] == rep["thresholds"]
    assert C.thresholds_from_manifest(m) == rep["thresholds"]
    load_model("", weights=art)  # the manifest still loads (sha unchanged)
    assert main(["calibrate", str(art), "--max-accuracy-loss", "2"]) == 2
    with pytest.raises(ModelError, match="confidence_exits"):
        C.thresholds_from_manifest(read_manifest(artifact))


def test_evaluate_helper_matches_manifest(artifact: Path) -> None:
    m = read_manifest(artifact)
    loaded = load_model("", weights=artifact)
    res = evaluate(loaded.module, "fashion-mnist", "calib", loaded.input_shape, m["preprocess"], 400)
    assert [e["accuracy"] for e in res["exits"]] == [e["calib_accuracy"] for e in m["exits"]]
