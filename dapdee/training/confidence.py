"""Confidence exits (SPINN / BranchyNet style) and artifact evaluation.

Rule (shared by calibration and the device client): a frame evaluates the *active* exits
shallow -> deep and leaves at the first exit k whose **max-softmax probability** is at least
threshold t_k; the final exit always answers. An exit whose threshold is ``None`` is inactive
(its head is not evaluated). Max-softmax was chosen over entropy because its thresholds read
directly as a probability in [0, 1] and it ranks frames almost identically on 10 classes.

Calibration (:func:`calibrate_thresholds`) chooses the thresholds on the calibration split
(carved from the train file, never trained on) so that the rule's accuracy loss vs the final
exit, plus Z (default 2.5) standard errors of that paired difference, stays within the bound —
the margin covers calibration noise, test noise and the greedy search's selection bias (with
Z = 1 the shipped AlexNet lost 1.5 % on test for a 1.2 % bound; with 2.5, 1.06 %). The result is
then checked on the test split and both are reported.

Cost of a policy: evaluating exits 1..k (the active ones) and leaving at k costs the FLOPs of
the union of their ancestor sets in the traced cost graph; "FLOPs saved" is
1 - E[cost] / FLOPs(ancestors(final exit)).

Progressive inference planned to stop at exit e (what the planner prices with
`confidence_exits`): the active exits k < e are checked in order and the rest of the frames
leave at e whatever its own threshold. Its outcome (:func:`by_exit_outcomes`) is the same rule
truncated at e: a frame whose first confident active exit is k < e leaves at k, every other
frame at e. `dapdee calibrate` records, on both splits, per planned exit the fraction leaving at
each active k < e and at e (they sum to 1) and the accuracy of the answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dapdee import data as D
from dapdee.models import ModelError, exit_names

RULE = "max_softmax"
DEFAULT_Z = 2.5
GRID = tuple(
    sorted({round(x, 6) for x in [i / 100 for i in range(30, 100)] + [1 - 10 ** (-k / 4) for k in range(8, 17)]})
)


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability per row of `logits` [N, classes] (or [classes]). O(N · classes)."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def is_confident(logits: torch.Tensor, threshold: float | None) -> bool:
    """For one frame's logits (batch of 1 or a vector): does this exit answer under `threshold`?
    `None` means the exit is inactive (never answers). O(classes)."""
    if threshold is None:
        return False
    # compared as a tensor, as every other use of the rule does (the threshold as float32)
    return bool((confidence(logits.reshape(-1)) >= threshold).item())


def first_confident_exit(
    logits_by_exit: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    thresholds: Sequence[float | None] | Mapping[str, float | None],
) -> torch.Tensor:
    """Index (into the exits, shallow -> deep) of the exit each row leaves at: the first exit k
    with threshold t_k not None and max-softmax >= t_k, else the last (final) exit, which always
    answers. Mappings are matched by exit name (missing names are inactive). Returns a LongTensor
    [N]. O(N · exits · classes)."""
    if isinstance(logits_by_exit, Mapping):
        names = list(logits_by_exit)
        logits = [logits_by_exit[n] for n in names]
        if isinstance(thresholds, Mapping):
            ts = [thresholds.get(n) for n in names]
        else:
            ts = list(thresholds)
    else:
        logits = list(logits_by_exit)
        names = exit_names(len(logits))
        ts = [thresholds.get(n) for n in names] if isinstance(thresholds, Mapping) else list(thresholds)
    if not logits:
        raise ValueError("first_confident_exit: no exits")
    if len(ts) not in (len(logits), len(logits) - 1):
        raise ValueError(f"first_confident_exit: {len(logits)} exits but {len(ts)} thresholds")
    n = logits[0].reshape(-1, logits[0].shape[-1]).shape[0]
    choice = torch.full((n,), len(logits) - 1, dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    for k in range(len(logits) - 1):
        t = ts[k]
        if t is None:
            continue
        hit = undecided & (confidence(logits[k].reshape(n, -1)) >= t)
        choice[hit] = k
        undecided &= ~hit
    return choice


def thresholds_from_manifest(manifest: Mapping[str, Any]) -> dict[str, float | None]:
    """{exit name: threshold or None} stored by `dapdee calibrate` under `confidence_exits`."""
    ce = manifest.get("confidence_exits")
    if not isinstance(ce, Mapping) or not isinstance(ce.get("thresholds"), Mapping):
        raise ModelError("manifest has no confidence_exits (run `dapdee calibrate ARTIFACT`)")
    return {str(k): (None if v is None else float(v)) for k, v in ce["thresholds"].items()}


# ---- policy cost and evaluation ----------------------------------------------------------------


class ExitCosts:
    """FLOPs of leaving at exit k after evaluating a set of active exits: the union of the
    ancestor sets. Built from a cost graph in O(exits · (V + E)); each query O(exits · V)."""

    def __init__(self, graph: Any) -> None:
        self.names = [e.name for e in graph.exits]
        self.flops = {n.name: int(n.flops) for n in graph.nodes}
        self.anc = [set(graph.ancestors(e.node)) for e in graph.exits]
        self.final_flops = sum(self.flops[v] for v in self.anc[-1])
        self._cache: dict[tuple[bool, ...], list[int]] = {}

    def per_exit(self, active: Sequence[bool]) -> list[int]:
        """FLOPs of a frame that leaves at exit k (k = 0..n-1) given which exits are active."""
        key = tuple(bool(a) for a in active[: len(self.names) - 1])
        if key not in self._cache:
            seen: set[str] = set()
            out = []
            for k in range(len(self.names)):
                if k == len(self.names) - 1 or key[k]:
                    seen |= self.anc[k]
                out.append(sum(self.flops[v] for v in seen | self.anc[k]))
            self._cache[key] = out
        return self._cache[key]


def policy_stats(
    conf: torch.Tensor, correct: torch.Tensor, thresholds: Sequence[float | None], costs: ExitCosts
) -> dict[str, Any]:
    """Accuracy, accuracy loss vs the final exit (+ its standard error), fraction of frames per
    exit and mean FLOPs of the rule on precomputed confidences `conf` [exits, N] and
    correctness `correct` [exits, N]. O(exits · N)."""
    n_exits, n = conf.shape
    choice = _leave(conf, thresholds)
    got = correct.gather(0, choice[None])[0].double()
    diff = correct[-1].double() - got  # paired per-frame loss vs the final exit
    per = costs.per_exit([t is not None for t in thresholds])
    counts = torch.bincount(choice, minlength=n_exits).tolist()
    mean_flops = sum(c * per[k] for k, c in enumerate(counts)) / n
    loss = float(diff.mean())
    return {
        "n": n,
        "accuracy": float(got.mean()),
        "final_accuracy": float(correct[-1].double().mean()),
        "accuracy_loss": loss,
        "loss_stderr": float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
        "exit_fraction": {costs.names[k]: c / n for k, c in enumerate(counts)},
        "mean_flops": mean_flops,
        "final_flops": costs.final_flops,
        "flops_saved": 1 - mean_flops / costs.final_flops,
    }


def _leave(conf: torch.Tensor, thresholds: Sequence[float | None]) -> torch.Tensor:
    """The exit each frame leaves at under the rule, from confidences `conf` [exits, N]: the
    first active exit whose confidence reaches its threshold, else the last. O(exits · N)."""
    n_exits, n = conf.shape
    choice = torch.full((n,), n_exits - 1, dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    for k in range(n_exits - 1):
        if thresholds[k] is None:
            continue
        hit = undecided & (conf[k] >= thresholds[k])
        choice[hit] = k
        undecided &= ~hit
    return choice


def by_exit_outcomes(
    conf: torch.Tensor, correct: torch.Tensor, thresholds: Sequence[float | None], names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per planned exit e (by name): `fractions` {active k < e and e: fraction of frames leaving
    there} under the rule truncated at e, and `accuracy` of its answers, on confidences `conf`
    and correctness `correct` [exits, N]. The fractions are counts / N (they sum to 1 up to
    rounding); the last exit's outcome is the whole rule's. O(exits² · N)."""
    n_exits, n = conf.shape
    choice = _leave(conf, thresholds)
    out: dict[str, dict[str, Any]] = {}
    for e in range(n_exits):
        leave = torch.where(choice < e, choice, torch.full_like(choice, e))
        counts = torch.bincount(leave, minlength=n_exits).tolist()
        keys = [k for k in range(e) if thresholds[k] is not None] + [e]
        out[names[e]] = {
            "fractions": {names[k]: counts[k] / n for k in keys},
            "accuracy": float(correct.gather(0, leave[None])[0].double().mean()),
        }
    return out


def calibrate_thresholds(
    conf: torch.Tensor, correct: torch.Tensor, costs: ExitCosts, max_loss: float, z: float = DEFAULT_Z
) -> list[float | None]:
    """Greedy threshold search on calibration data: start with every early exit inactive (loss
    0), then repeatedly take the single threshold change (any exit, any grid value) that saves
    the most FLOPs per unit of added loss while keeping loss + z·stderr <= max_loss; stop when
    no change saves FLOPs. Returns one threshold (or None) per early exit plus None for the
    final. O(rounds · exits · |GRID| · exits · N), rounds <= exits · |GRID|."""
    n_exits = conf.shape[0]
    ts: list[float | None] = [None] * n_exits
    cur = policy_stats(conf, correct, ts, costs)
    while True:
        best: tuple[float, list[float | None], dict[str, Any]] | None = None
        for k in range(n_exits - 1):
            for t in GRID:
                if ts[k] is not None and t >= ts[k]:
                    continue
                cand = list(ts)
                cand[k] = t
                st = policy_stats(conf, correct, cand, costs)
                if st["accuracy_loss"] + z * st["loss_stderr"] > max_loss + 1e-12:
                    continue
                saved = cur["mean_flops"] - st["mean_flops"]
                if saved <= 0:
                    continue
                score = saved / max(st["accuracy_loss"] - cur["accuracy_loss"], 1e-6)
                if best is None or score > best[0]:
                    best = (score, cand, st)
        if best is None:
            return ts
        ts, cur = best[1], best[2]


# ---- artifact-level commands ---------------------------------------------------------------

# Fewest calibration samples `calibrate` accepts: below ~30 the paired loss's standard error is
# too noisy (0 on one sample) for the z margin to protect the bound.
MIN_CALIB_SAMPLES = 30


def _few(names: Sequence[Any], shown: int = 6) -> str:
    """`names` as a Python list, cut after `shown` entries with the total count. O(shown)."""
    head = [str(n) for n in names[:shown]]
    return repr(head) if len(names) <= shown else f"{repr(head)[:-1]}, ... ({len(names)} in all)]"


def check_dataset_classes(manifest: Mapping[str, Any], dataset: str) -> None:
    """ValueError naming --dataset unless `dataset`'s class names, by label, are the manifest's
    `classes` (labels are class indexes, so the order matters too); a manifest without `classes`
    is not checked. O(files) for a folder dataset, O(classes) otherwise."""
    want = manifest.get("classes")
    if not want:
        return
    got = list(D.class_names(dataset))
    if got != [str(c) for c in want]:
        raise ValueError(
            f"--dataset {D.parse_dataset(dataset).text}: its classes {_few(got)} are not the artifact's "
            f"(manifest classes {_few(want)}); labels are class indexes, so names and order must match"
        )


def _artifact_logits(
    loaded: Any, dataset: str, split: str, limit: int | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    from dapdee.training.train import predict_logits

    manifest = loaded.manifest
    pre = manifest.get("preprocess") or D.default_preprocess(dataset, loaded.input_shape)
    return predict_logits(loaded.module, dataset, split, loaded.input_shape, pre, limit)


def _load(artifact: str | Path, model: str = "") -> Any:
    """The artifact's model: built from `model` when given (the spec its weights belong to; a
    `package.module:factory` spec must be named), else as its manifest builds it (only a `zoo:`
    spec: `load_model`)."""
    from dapdee.models import load_model

    return load_model(model, weights=artifact)


def evaluate_artifact(
    artifact: str | Path, dataset: str | None = None, split: str = "test", limit: int | None = None, model: str = ""
) -> dict[str, Any]:
    """Per-exit accuracy of an artifact recomputed from its weights alone (manifest preprocessing;
    default dataset and sample count: the manifest's), compared with the manifest's accuracies
    (agreement: within 2 samples, allowing for a thread-count-dependent argmax tie); `model` as
    `_load` takes it; ValueError naming --dataset when its classes are not the manifest's. O(N · forward)."""
    loaded = _load(artifact, model)
    m = loaded.manifest
    dataset = dataset or m.get("dataset") or "fashion-mnist"
    check_dataset_classes(m, dataset)
    if limit is None:
        limit = (m.get("splits") or {}).get(split)
    logits, labels = _artifact_logits(loaded, dataset, split, limit)
    names = [e.name for e in loaded.graph.exits]
    if len(names) != len(logits):
        names = exit_names(len(logits))
    stored = {e["name"]: e.get("accuracy" if split == "test" else f"{split}_accuracy") for e in m.get("exits") or []}
    exits = []
    worst = 0.0
    for nm, lg in zip(names, logits, strict=True):
        acc = int((lg.argmax(1) == labels).sum()) / len(labels)
        ref = stored.get(nm)
        if ref is not None:
            worst = max(worst, abs(acc - ref))
        exits.append({"name": nm, "accuracy": acc, "manifest_accuracy": ref})
    comparable = (
        all(e["manifest_accuracy"] is not None for e in exits)
        and D.parse_dataset(dataset).text == m.get("dataset")
        and len(labels) == (m.get("splits") or {}).get(split)
    )
    return {
        "artifact": str(artifact),
        "name": loaded.name,
        "model": loaded.spec,
        "dataset": D.parse_dataset(dataset).text,
        "split": split,
        "n": len(labels),
        "exits": exits,
        "max_abs_diff": worst if comparable else None,
        "agrees_with_manifest": (worst <= 2 / len(labels)) if comparable else None,
    }


def _split_outcomes(
    loaded: Any, artifact: str | Path, dataset: str, split: str, limit: int | None, exits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) per exit and image of one split, each [exits, N]. O(one inference pass)."""
    logits, labels = _artifact_logits(loaded, dataset, split, limit)
    if len(logits) != exits:
        raise ModelError(f"artifact {str(artifact)!r}: model gives {len(logits)} exits, graph has {exits}")
    return torch.stack([confidence(lg) for lg in logits]), torch.stack([lg.argmax(1) == labels for lg in logits])


def _check_calib_size(dataset: str, n: int) -> None:
    """ValueError naming --limit when `dataset`'s calibration split (as cut) holds `n` <
    MIN_CALIB_SAMPLES samples. O(1)."""
    if n < MIN_CALIB_SAMPLES:
        raise ValueError(
            f"calibration split of {D.parse_dataset(dataset).text}: {n} samples, need at least {MIN_CALIB_SAMPLES} "
            "(set by --limit, default the manifest's calib split; a folder's is a tenth of its training images)"
        )


def calibrate_artifact(
    artifact: str | Path,
    max_accuracy_loss: float = 0.012,
    dataset: str | None = None,
    limit: int | None = None,
    write: bool = True,
    z: float = DEFAULT_Z,
    model: str = "",
) -> dict[str, Any]:
    """Calibrate max-softmax thresholds on the calibration split, check them on the test split,
    and (with `write`) store them in the manifest under `confidence_exits`. Returns the report:
    thresholds, per-split accuracy loss, fraction of frames per exit, FLOPs saved, and per split
    `by_exit` (`by_exit_outcomes`: per planned exit the fractions and accuracy of progressive
    inference truncated there) and the `dataset` used; `model` as `_load` takes it. ValueError for
    a dataset whose classes are not the manifest's, or a calibration split under
    MIN_CALIB_SAMPLES. Cost: two inference passes plus the greedy search."""
    from dapdee.training.train import write_manifest

    if not 0 <= max_accuracy_loss < 1:
        raise ValueError(f"--max-accuracy-loss {max_accuracy_loss}: expected a fraction in [0, 1)")
    if not 0 <= z <= 10:
        raise ValueError(f"--z {z}: expected a number of standard errors in [0, 10]")
    loaded = _load(artifact, model)
    m = loaded.manifest
    dataset = dataset or m.get("dataset") or "fashion-mnist"
    check_dataset_classes(m, dataset)
    splits = m.get("splits") or {}
    costs = ExitCosts(loaded.graph)

    n = len(costs.names)
    data = {"calib": _split_outcomes(loaded, artifact, dataset, "calib", limit or splits.get("calib"), n)}
    _check_calib_size(dataset, data["calib"][0].shape[1])  # before the test split's pass
    data["test"] = _split_outcomes(loaded, artifact, dataset, "test", limit or splits.get("test"), n)
    ts = calibrate_thresholds(*data["calib"], costs, max_accuracy_loss, z)
    cal = policy_stats(*data["calib"], ts, costs)
    test = policy_stats(*data["test"], ts, costs)
    cal["by_exit"] = by_exit_outcomes(*data["calib"], ts, costs.names)
    test["by_exit"] = by_exit_outcomes(*data["test"], ts, costs.names)
    thresholds = {nm: t for nm, t in zip(costs.names, ts, strict=True)}
    report = {
        "artifact": str(artifact),
        "name": loaded.name,
        "dataset": D.parse_dataset(dataset).text,
        "rule": RULE,
        "rule_text": "leave at the first active exit whose max softmax probability >= its threshold; "
        "null = exit inactive; the final exit always answers",
        "max_accuracy_loss": max_accuracy_loss,
        "selection": f"greedy on the calib split: loss + {z:g} stderr <= bound",
        "z": z,
        "thresholds": thresholds,
        "exit_flops": dict(zip(costs.names, costs.per_exit([t is not None for t in ts]), strict=True)),
        "calib": cal,
        "test": test,
        "within_bound_on_test": test["accuracy_loss"] <= max_accuracy_loss,
    }
    if write:
        m = dict(m)
        m["confidence_exits"] = {k: v for k, v in report.items() if k not in ("artifact", "name")}
        write_manifest(artifact, m)
    return report
