"""CLI: `dapdee train`, `dapdee eval`, `dapdee calibrate` (see dapdee.training.train / .confidence)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dapdee.cli import ARTIFACT_MODEL_HELP, non_negative_float, positive_float, positive_int, thread_count

MAX_INPUT_SIDE = 4096  # pixels: a bigger square input is a typo (its batches would not fit in memory)


def input_side(text: str) -> int:
    """argparse type: a square input side in pixels, 1 to MAX_INPUT_SIDE."""
    v = positive_int(text)
    if v > MAX_INPUT_SIDE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_INPUT_SIDE} pixels, got {text!r}")
    return v


def _weights_arg(text: str) -> list[float]:
    try:
        weights = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit weights {text!r}: expected numbers like 0.3,0.6,1") from None
    if not all(0 <= w < float("inf") for w in weights):  # nan fails this too: it would train to NaN
        raise argparse.ArgumentTypeError(f"exit weights {text!r}: expected finite numbers >= 0")
    return weights


def add_commands(sub: Any) -> None:
    """Register train, eval and calibrate on the `dapdee` subparsers."""
    _add_train(sub)
    _add_eval(sub)
    _add_calibrate(sub)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="jointly train a model's exits (BranchyNet loss) and write an artifact",
        description="Train every exit jointly with L = sum_n w_n CE(exit_n); writes weights.safetensors + "
        "manifest.json to --out. Re-running the same command resumes from OUT/checkpoint.",
    )
    p.add_argument("model", help="zoo:NAME?opt=v (e.g. zoo:resnet18?width=0.25&in_channels=1) or pkg.mod:factory")
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="fashion-mnist[:DIR], cifar10:DIR (binary version) or folder:DIR (DIR/<class>/<image>, "
        "your own images; DIR/train and DIR/test are used when both exist)",
    )
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.05, help="peak SGD learning rate (warm-up, then cosine)")
    p.add_argument(
        "--exit-weights", type=_weights_arg, default=None, help="w1,...,wn (default: k/n, rising with depth)"
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="SGD L2 weight decay (finite, >= 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=positive_int, default=None, help="use at most N samples of each split (quick runs)")
    p.add_argument("--input-size", type=input_side, default=32, help="square model input side in pixels (<= 4096)")
    p.add_argument("--name", default=None, help="model name recorded in the manifest (default: the zoo name)")
    p.add_argument("--notes", default="", help="free text stored in the manifest")
    p.add_argument("--threads", type=thread_count, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--stop-after", type=positive_int, default=None, help="stop after this epoch, keeping the checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.set_defaults(func=_train)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="recompute an artifact's per-exit accuracy from its weights (JSON)")
    p.add_argument("artifact", help="artifact directory (weights.safetensors + manifest.json)")
    p.add_argument("--model", default="", help=ARTIFACT_MODEL_HELP)
    p.add_argument("--dataset", default=None, help="default: the manifest's dataset")
    p.add_argument("--split", default="test", choices=("train", "calib", "test"))
    p.add_argument("--limit", type=positive_int, default=None, help="default: the manifest's split size")
    p.add_argument("--threads", type=thread_count, default=None)
    p.set_defaults(func=_eval)


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="pick confidence-exit thresholds within an accuracy-loss bound; store them in the manifest",
    )
    p.add_argument("artifact")
    p.add_argument("--model", default="", help=ARTIFACT_MODEL_HELP)
    p.add_argument("--max-accuracy-loss", type=float, default=0.012, help="bound vs the final exit (fraction)")
    p.add_argument("--dataset", default=None, help="default: the manifest's dataset")
    p.add_argument("--limit", type=positive_int, default=None, help="default: the manifest's split sizes")
    p.add_argument("--threads", type=thread_count, default=None)
    p.add_argument(
        "--z",
        type=float,
        default=2.5,
        help="safety margin in standard errors of the calib loss (default 2.5)",
    )
    p.add_argument("--dry-run", action="store_true", help="print, do not write the manifest")
    p.set_defaults(func=_calibrate)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _train(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from dapdee.training.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        exit_weights=args.exit_weights,
        seed=args.seed,
        limit=args.limit,
        input_size=args.input_size,
        name=args.name,
        weight_decay=args.weight_decay,
        notes=args.notes,
    )
    res = train(
        cfg,
        progress=not args.no_progress,
        stop_after=args.stop_after,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    if "stopped_after" in res:
        return 0
    print(json.dumps({"artifact": args.out, "name": res["name"], "exits": res["exits"]}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from dapdee.training.confidence import evaluate_artifact

    print(json.dumps(evaluate_artifact(args.artifact, args.dataset, args.split, args.limit, args.model), indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    _threads(args.threads)
    from dapdee.training.confidence import calibrate_artifact

    res = calibrate_artifact(
        args.artifact,
        args.max_accuracy_loss,
        dataset=args.dataset,
        limit=args.limit,
        write=not args.dry_run,
        z=args.z,
        model=args.model,
    )
    print(json.dumps(res, indent=2))
    return 0
