"""Joint training of every exit (BranchyNet): L = Σ_n w_n · CE(exit_n), seeded, resumable.

Artifact directory written by :func:`train` (read by :func:`dapdee.models.load_model`):

- ``weights.safetensors`` — the module's state dict (never pickle);
- ``manifest.json`` — name, model spec, input shape, preprocessing recipe, exits with held-out
  (test split) accuracy, dataset, split sizes, training config, history, weights sha256,
  wall time.

While training, ``OUT/checkpoint/`` holds the last finished epoch (``state-E.safetensors``:
model weights and optimizer momentum after epoch E; ``state.json``: epoch, config, history and
the name and sha256 of that weights file, replaced only after the file is complete, so the pair
is consistent whenever a write fails). Re-running the same command resumes after that epoch and
ends with the same weights as an uninterrupted run (the batch order of epoch e depends only on
(seed, e); the learning rate only on the step). A run whose loss or weights stop being finite
(too high a learning rate) stops with an error naming the epoch; nothing non-finite is written.

Default exit weights rise with depth, w_n = n / N for N exits (the final exit counts most, so
the backbone's own accuracy is not traded away for the shallow heads').
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dapdee import data as D
from dapdee.atomic_file import write_text_atomically
from dapdee.costgraph import is_finite_number
from dapdee.models import (
    MANIFEST,
    WEIGHTS,
    ModelError,
    build_module,
    check_model_name,
    exit_names,
    parse_spec,
    sha256_file,
)

CHECKPOINT_DIR = "checkpoint"
MAX_SEED = 2**40 - 1  # the per-epoch seeds derived from it stay within torch's int64
RNG_KEY = "rng.cpu"  # torch's global random state in a checkpoint's weights file
ARTIFACT_FORMAT = "dapdee-artifact/1"
EVAL_BATCH = 256


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the manifest and the checkpoint)."""

    model: str
    dataset: str
    out: str
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    exit_weights: list[float] | None = None
    seed: int = 0
    limit: int | None = None
    input_size: int = 32
    name: str | None = None
    weight_decay: float = 5e-4
    momentum: float = 0.9
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed."""
        d = asdict(self)
        for k in ("out", "notes", "extra"):
            d.pop(k)
        return d


def default_exit_weights(n: int) -> list[float]:
    """w_k = k / n for k = 1..n (rising with depth)."""
    return [round(k / n, 6) for k in range(1, n + 1)]


def model_outputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The module's logits per exit as a tuple (a single-tensor output is one exit)."""
    out = module(x)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def lr_at(step: int, total: int, base: float) -> float:
    """Learning rate at optimizer step `step` of `total`: linear warm-up over the first
    min(200, 5 %) steps, then cosine decay to 0. O(1)."""
    warm = max(1, min(200, total // 20))
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def input_shape_for(spec: str, input_size: int, channels: int = 3) -> tuple[int, int, int, int]:
    """[1, C, S, S]: C is a zoo spec's in_channels option (default 3), `channels` for a
    `pkg.mod:factory` spec (whose module says what it takes; see `module_channels`)."""
    ms = parse_spec(spec)
    c = int(ms.options.get("in_channels", 3)) if ms.kind == "zoo" else int(channels)
    return (1, c, int(input_size), int(input_size))


def module_channels(module: nn.Module) -> int | None:
    """The input channels of the module's first convolution (registration order), or None
    without one. O(modules)."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def check_finite(module: nn.Module, what: str) -> None:
    """ValueError naming the first tensor of the module's state dict (weights, batch-norm
    statistics) that holds NaN or inf: the run diverged, `what` is not written. O(parameters)."""
    for k, v in module.state_dict().items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"training diverged: {k} holds NaN or inf, so {what} is not written; lower --lr "
                "(or --weight-decay) and train again (another --out, or delete its checkpoint directory)"
            )


@torch.inference_mode()
def predict_logits(
    module: nn.Module,
    dataset: str | D.DatasetRef,
    split: str,
    input_shape: tuple[int, ...],
    preprocess: dict[str, Any],
    limit: int | None = None,
    batch_size: int = EVAL_BATCH,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(logits per exit [N, classes] each, labels [N]) of the module in eval mode on one split.
    O(N · forward cost)."""
    was_training = module.training
    module.eval()
    outs: list[list[torch.Tensor]] = []
    ys = []
    for x, y in D.iter_batches(dataset, split, input_shape, preprocess, batch_size, limit):
        logits = model_outputs(module, x)
        if not outs:
            outs = [[] for _ in logits]
        for i, lg in enumerate(logits):
            outs[i].append(lg.float())
        ys.append(y)
    module.train(was_training)
    if not ys:
        raise D.DataError(f"split {split!r} is empty")
    return [torch.cat(o) for o in outs], torch.cat(ys)


def accuracies(logits: list[torch.Tensor], labels: torch.Tensor) -> list[float]:
    """Top-1 accuracy of each exit's logits. O(N · exits · classes)."""
    return [int((lg.argmax(1) == labels).sum()) / len(labels) for lg in logits]


def evaluate(
    module: nn.Module,
    dataset: str | D.DatasetRef,
    split: str,
    input_shape: tuple[int, ...],
    preprocess: dict[str, Any],
    limit: int | None = None,
) -> dict[str, Any]:
    """{"split", "n", "exits": [{"name", "accuracy"}]} for one split. O(N · forward cost)."""
    logits, labels = predict_logits(module, dataset, split, input_shape, preprocess, limit)
    names = exit_names(len(logits))
    return {
        "split": split,
        "n": len(labels),
        "exits": [{"name": n, "accuracy": a} for n, a in zip(names, accuracies(logits, labels), strict=True)],
    }


# ---- checkpoints --------------------------------------------------------------------------


def _save_checkpoint(ckdir: Path, module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Store weights + momentum of epoch `state["epoch"]` and torch's global random state (a
    model's dropout draws from it: a resumed run must go on with the same draws) in a new file,
    then (atomically) `state.json` naming it and its sha256, then delete the older weights: a
    failure at any step leaves a `state.json` whose weights file is intact. O(parameters)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    tensors[RNG_KEY] = torch.get_rng_state()
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.{i}"] = buf.detach().contiguous().clone()
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"state-{int(state['epoch'])}.safetensors"
    save_file(tensors, str(ckdir / (name + ".tmp")))
    os.replace(ckdir / (name + ".tmp"), ckdir / name)
    state = {**state, "weights_file": name, "weights_sha256": sha256_file(ckdir / name)}
    (ckdir / "state.json.tmp").write_text(json.dumps(state, indent=1))
    os.replace(ckdir / "state.json.tmp", ckdir / "state.json")
    for old in ckdir.glob("state*.safetensors*"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_checkpoint(ckdir: Path, cfg: TrainConfig, module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        state = json.loads((ckdir / "state.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"checkpoint {str(ckdir)!r}: unreadable state.json ({exc}); delete the directory") from None
    bad = _state_problem(state)
    if bad:
        raise ValueError(f"checkpoint {str(ckdir)!r}: unreadable state.json ({bad}); delete the directory")
    if state.get("config") != cfg.identity():
        diff = sorted(k for k in cfg.identity() if state.get("config", {}).get(k) != cfg.identity()[k])
        raise ValueError(
            f"checkpoint in {str(ckdir)!r} was written by a different run (differs in {', '.join(diff)}); "
            "use the same options, another --out, or delete the checkpoint"
        )
    wname = state.get("weights_file", "state.safetensors")  # checkpoints before weights_file: one fixed name
    if not isinstance(wname, str) or Path(wname).name != wname or not wname.endswith(".safetensors"):
        raise ValueError(
            f"checkpoint {str(ckdir)!r}: state.json names a bad weights_file {wname!r}; delete the directory"
        )
    wpath = ckdir / wname
    if not wpath.is_file() or sha256_file(wpath) != state.get("weights_sha256"):
        raise ValueError(f"checkpoint {str(ckdir)!r}: {wname} missing or does not match state.json")
    tensors = load_file(str(wpath))
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"opt.{i}"].clone()
    if RNG_KEY in tensors:  # checkpoints before it: the draws of a model with dropout differ
        torch.set_rng_state(tensors[RNG_KEY])
    return state


def _state_problem(state: Any) -> str | None:
    """What is wrong with a parsed `state.json` (None: an object with the int `epoch`, list
    `history`, number `wall_time_s` and object `config` a resume reads). O(1)."""
    if not isinstance(state, dict):
        return f"expected an object, got {type(state).__name__}"
    for key, kind in (("epoch", int), ("history", list)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{key}: missing or not {kind.__name__}"
    if not is_finite_number(state.get("wall_time_s")):  # an integer past a float's range too
        return "wall_time_s: missing or not a number"
    if not isinstance(state.get("config"), dict):
        return "config: missing or not an object"
    return None


# ---- training -----------------------------------------------------------------------------


@dataclass
class _Data:
    """A run's checked inputs: the spec, the artifact name, the train split and where it goes."""

    name: str
    ref: Any  # dapdee.data.DatasetRef
    images: Any
    labels: Any
    input_shape: tuple[int, ...]
    preprocess: dict[str, Any]
    out: Path
    n_calib: int
    n_test: int

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT_DIR


def _check_options(cfg: TrainConfig) -> None:
    """ValueError naming the first numeric option out of range."""
    if cfg.epochs < 1 or cfg.batch_size < 2 or not 0 < cfg.lr < math.inf:  # nan fails the lr test too
        raise ValueError("need --epochs >= 1, --batch-size >= 2 and a finite --lr > 0")
    if not 0 <= cfg.weight_decay < math.inf:
        raise ValueError(f"--weight-decay: expected a finite number >= 0, got {cfg.weight_decay!r}")
    if cfg.limit is not None and cfg.limit < 2:
        raise ValueError("--limit must be at least 2")
    if isinstance(cfg.seed, bool) or not 0 <= cfg.seed <= MAX_SEED:  # epoch e's batch order: seed·100003 + e
        raise ValueError(f"--seed: expected an integer in 0..{MAX_SEED}, got {cfg.seed!r}")


def _check_split_sizes(ref: D.DatasetRef, sizes: dict[str, int]) -> None:
    """DataError naming the splits too small to train (< 2 samples) or evaluate on (empty)."""
    small = [k for k, n in sizes.items() if n < (2 if k == "train" else 1)]
    if not small:
        return
    hint = {
        "train": "training needs at least 2 images",
        "calib": f"calib holds 1 in 10 of the training images (at most {D.CALIB_SIZE}): give at least 10",
        "test": "give test images (DIR/test/<class>/..., else 1 in 5 images of DIR is a test image)",
    }
    counts = ", ".join(f"{k} {n}" for k, n in sizes.items())
    raise D.DataError(
        f"dataset {ref.text!r} is too small: the {' and '.join(small)} split would be "
        f"{'empty' if all(sizes[k] == 0 for k in small) else 'too small'} ({counts}); "
        + "; ".join(hint[k] for k in small)
    )


def _checked_data(cfg: TrainConfig) -> _Data:
    """The run's inputs, after checking the options (ValueError naming the bad one) and that
    every split has data (DataError), before any training. The input channels of a
    `pkg.mod:factory` model are the dataset's here (`_seeded_module` may correct them)."""
    _check_options(cfg)
    spec = parse_spec(cfg.model)  # a bad spec is named before any data is read
    name = check_model_name(cfg.name or spec.default_name)
    ref = D.parse_dataset(cfg.dataset)
    cfg.dataset = ref.text
    images, labels = D.load_raw(ref, "train", cfg.limit)
    input_shape = input_shape_for(cfg.model, cfg.input_size, ref.source_shape[0])
    out = Path(cfg.out)
    if (out / MANIFEST).exists() and not (out / CHECKPOINT_DIR).exists():
        raise ValueError(f"{str(out)!r} already holds a trained artifact; choose another --out or delete it")
    n_calib = len(D.load_raw(ref, "calib", cfg.limit)[1])
    n_test = len(D.load_raw(ref, "test", cfg.limit)[1])
    _check_split_sizes(ref, {"train": len(labels), "calib": n_calib, "test": n_test})
    preprocess = D.default_preprocess(ref, input_shape)
    return _Data(name, ref, images, labels, input_shape, preprocess, out, n_calib, n_test)


def _prepare_out(out: Path) -> None:
    """Create the artifact directory `out` (and its parents) now, so that an --out that cannot
    hold the artifact is named before any training: ValueError naming --out. O(depth)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r}: cannot create the directory ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r}: the directory is not writable")


def _seeded_module(cfg: TrainConfig, data: _Data) -> tuple[nn.Module, int]:
    """The seeded module and its number of exits; fills in the default exit weights and checks
    the classes and the weights against the exits (ModelError / ValueError naming them). A
    `pkg.mod:factory` module's first convolution sets `data`'s input channels (a grayscale
    dataset is replicated for an RGB model); a module that fails on a probe batch is a
    ModelError saying so."""
    torch.manual_seed(cfg.seed)
    spec = parse_spec(cfg.model)
    module = build_module(spec)
    channels = module_channels(module) if spec.kind == "import" else None
    if channels is not None and channels != data.input_shape[1]:  # e.g. an RGB factory on grayscale images
        data.input_shape = (1, channels, *data.input_shape[2:])
        data.preprocess = D.default_preprocess(data.ref, data.input_shape)
    x = D.preprocess_images(data.images[:2], data.input_shape, data.preprocess)
    try:
        with torch.no_grad():
            probe = model_outputs(module, x)
        if not probe or not all(isinstance(p, torch.Tensor) and p.ndim == 2 for p in probe):
            raise TypeError("expected [N, classes] logits, or a tuple of them (one per exit)")
    except Exception as exc:
        reason = str(exc).strip().partition("\n")[0]  # one line: torch's messages carry a C++ trace
        raise ModelError(
            f"model {cfg.model!r} cannot run on input {list(data.input_shape)} (the dataset's images at "
            f"--input-size {cfg.input_size}): {type(exc).__name__}: {reason}"
        ) from None
    n_exits = len(probe)
    if any(p.shape[-1] <= int(data.labels.max()) for p in probe):
        raise ModelError(
            f"model {cfg.model!r} has {probe[0].shape[-1]} classes; the dataset needs {int(data.labels.max()) + 1} "
            "(give the model's num_classes option, e.g. zoo:resnet18?num_classes=N)"
        )
    if cfg.exit_weights is None:
        cfg.exit_weights = default_exit_weights(n_exits)
    if len(cfg.exit_weights) != n_exits or any(w < 0 for w in cfg.exit_weights) or sum(cfg.exit_weights) <= 0:
        raise ValueError(
            f"--exit-weights: model {cfg.model!r} has {n_exits} exits, got {len(cfg.exit_weights)} weights "
            "(need one non-negative weight per exit, not all zero)"
        )
    return module, n_exits


def _optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on biases and norm parameters."""
    decay, no_decay = [], []
    for p in module.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )


def _train_epoch(
    module: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, data: _Data, epoch: int, progress: bool
) -> dict[str, Any]:
    """One epoch of the joint exit loss in the epoch's seeded batch order; its history record
    (mean loss, train accuracy per exit). ValueError as soon as a batch's loss is not finite
    (the run diverged). O(N_train · (forward + backward))."""
    from tqdm import tqdm

    module.train()
    n = len(data.labels)
    steps = math.ceil(n / cfg.batch_size)
    w = torch.tensor(cfg.exit_weights, dtype=torch.float32)
    ys = torch.as_tensor(data.labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    loss_sum, seen, correct = 0.0, 0, [0] * len(w)
    desc = f"{data.name} epoch {epoch + 1}/{cfg.epochs}"
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0, leave=False)
    for b in bar:
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if len(idx) < 2:
            continue  # batch-norm needs two samples; at most one sample per epoch is skipped
        x = D.preprocess_images(data.images[idx.numpy()], data.input_shape, data.preprocess)
        y = ys[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch * steps + b, steps * cfg.epochs, cfg.lr)
        outs = model_outputs(module, x)
        loss = (w * torch.stack([F.cross_entropy(o, y) for o in outs])).sum()
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            raise ValueError(
                f"training diverged: the loss is {value} in epoch {epoch + 1}, step {b + 1}/{steps}; nothing of "
                f"this epoch is saved; lower --lr (or --weight-decay) and train again (another --out, or delete "
                f"{str(data.checkpoint)!r})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += value * len(y)
        seen += len(y)
        for i, o in enumerate(outs):
            correct[i] += int((o.argmax(1) == y).sum())
        if progress:
            acc = "/".join(f"{c / seen:.3f}" for c in correct)
            bar.set_postfix_str(f"loss={loss_sum / seen:.3f} acc={acc}", refresh=False)
    bar.close()
    names = exit_names(len(w))
    return {
        "epoch": epoch + 1,
        "loss": loss_sum / max(1, seen),
        "train_accuracy": {nm: c / max(1, seen) for nm, c in zip(names, correct, strict=True)},
    }


def _manifest(
    cfg: TrainConfig, data: _Data, history: list[dict[str, Any]], evals: tuple[dict, dict], times: tuple[float, float]
) -> dict[str, Any]:
    """The artifact's manifest: `evals` = (test, calib) evaluations, `times` = (training wall
    time, total time) in seconds."""
    test, calib = evals
    return {
        "format": ARTIFACT_FORMAT,
        "name": data.name,
        "model": cfg.model,
        "input_shape": list(data.input_shape),
        "preprocess": data.preprocess,
        "exits": [
            {"name": e["name"], "accuracy": e["accuracy"], "calib_accuracy": c["accuracy"]}
            for e, c in zip(test["exits"], calib["exits"], strict=True)
        ],
        "accuracy_split": "test",
        "dataset": data.ref.text,
        "dataset_kind": data.ref.kind,
        "classes": list(D.class_names(data.ref)),
        "splits": {
            "train": len(data.labels),
            "calib": data.n_calib,
            "test": data.n_test,
            **D.split_sources(data.ref),
            "split_seed": D.SPLIT_SEED,
            "limit": cfg.limit,
        },
        "training": {
            **cfg.identity(),
            "loss": "sum_n w_n * cross_entropy(exit_n)",
            "optimizer": "SGD nesterov",
            "schedule": "linear warm-up min(200 steps, 5%), cosine to 0, per step",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **cfg.extra,
        },
        "epochs": cfg.epochs,
        "history": history,
        "weights_sha256": sha256_file(data.out / WEIGHTS),
        "wall_time_s": round(times[0], 1),
        "total_time_s": round(times[1], 1),
        **({"notes": cfg.notes} if cfg.notes else {}),
    }


def train(
    cfg: TrainConfig, progress: bool = True, stop_after: int | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.dataset`'s train split with the joint exit loss, evaluate every
    exit on the test (and calibration) split, and write the artifact to `cfg.out`. Returns the
    manifest; with `stop_after` = e, stops after epoch e leaving only the checkpoint (returns
    {"stopped_after": e}). Cost: O(epochs · N_train · (forward + backward)) plus two eval passes."""
    from safetensors.torch import save_file

    t_start = time.time()
    data = _checked_data(cfg)
    module, _ = _seeded_module(cfg, data)
    _prepare_out(data.out)
    opt = _optimizer(module, cfg)
    history: list[dict[str, Any]] = []
    start_epoch, prior_wall = 0, 0.0
    if (data.checkpoint / "state.json").exists():
        state = _load_checkpoint(data.checkpoint, cfg, module, opt)
        start_epoch, history, prior_wall = int(state["epoch"]), list(state["history"]), float(state["wall_time_s"])
        log(f"resuming {data.name} from {data.checkpoint} after epoch {start_epoch}/{cfg.epochs}")
    t_run = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        rec = _train_epoch(module, opt, cfg, data, epoch, progress)
        history.append(rec)
        accs = " ".join(f"{nm}={a:.4f}" for nm, a in rec["train_accuracy"].items())
        log(f"{data.name} epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.4f}, train acc {accs} "
            f"({time.time() - t_run:.0f}s)")  # fmt: skip
        wall = prior_wall + time.time() - t_run
        state = {"epoch": epoch + 1, "config": cfg.identity(), "history": history, "wall_time_s": wall}
        check_finite(module, f"the checkpoint of epoch {epoch + 1}")
        _save_checkpoint(data.checkpoint, module, opt, state)
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
            log(f"stopped after epoch {epoch + 1}; run the same command again to resume")
            return {"stopped_after": epoch + 1, "history": history}

    module.eval()
    test = evaluate(module, data.ref, "test", data.input_shape, data.preprocess, cfg.limit)
    calib = evaluate(module, data.ref, "calib", data.input_shape, data.preprocess, cfg.limit)
    check_finite(module, "the artifact")
    data.out.mkdir(parents=True, exist_ok=True)
    weights = data.out / WEIGHTS  # written then renamed: a failed write leaves the artifact as it was
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(weights) + ".tmp")
    os.replace(str(weights) + ".tmp", weights)
    times = (prior_wall + time.time() - t_run, time.time() - t_start + prior_wall)
    manifest = _manifest(cfg, data, history, (test, calib), times)
    write_manifest(data.out, manifest)
    shutil.rmtree(data.checkpoint, ignore_errors=True)
    accs = " ".join(f"{e['name']}={e['accuracy']:.4f}" for e in manifest["exits"])
    log(f"{data.name}: test accuracy {accs}; wrote {data.out}")
    return manifest


def write_manifest(artifact: str | Path, manifest: dict[str, Any]) -> None:
    """Store `manifest` as the artifact's manifest.json, replaced whole (`write_text_atomically`:
    two calibrations of one artifact at once each write it whole). O(size)."""
    write_text_atomically(Path(artifact) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
