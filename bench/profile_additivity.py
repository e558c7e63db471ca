"""How far is the additive cost model from reality on this machine, and how good is the
FLOPs-based predictor?

For each zoo model: the sum of per-node median latencies (what the planner adds up) vs one
measured whole-model forward, through nn.Module and through the split executor the device and
edge actually run; ratio 1.0 means perfectly additive. Then a per-op-type linear
FLOPs predictor fitted on one model predicts the others' node latencies (Neurosurgeon-style):
median relative error per node and relative error of the whole-model sum.

    python bench/profile_additivity.py [--width 0.25] [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from dapdee.models import load_model
from dapdee.profiler import FlopsPredictor, measure_forward_ms, profile_model

MODELS = ("alexnet", "vgg16", "resnet18", "inception")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    profiles = {}
    print(f"threads={args.threads} repeats={args.repeats} width={args.width}")
    cols = ("model", "nodes", "sum(node ms)", "module fwd ms", "ratio", "executor ms", "ratio")
    print("{:10} {:>5} {:>13} {:>13} {:>6} {:>11} {:>6}".format(*cols))
    for name in tqdm(MODELS, desc="profiling", leave=False):
        m = load_model(f"zoo:{name}?width={args.width}")
        g = profile_model(m, "edge", threads=args.threads, repeats=args.repeats)
        fwd = measure_forward_ms(m, repeats=args.repeats, threads=args.threads)
        exe = measure_forward_ms(m, repeats=args.repeats, threads=args.threads, via_executor=True)
        total = sum(n.edge_ms for n in g.nodes)
        profiles[name] = g
        print(
            f"{name:10} {len(g.nodes):5d} {total:13.3f} {fwd:13.3f} {total / fwd:6.2f} {exe:11.3f} {total / exe:6.2f}"
        )
    print("\nFLOPs predictor: fit on one model, predict the others")
    print(f"{'fit on':10} {'predict':10} {'node median rel err':>20} {'sum rel err':>12}")
    for src in MODELS:
        pred = FlopsPredictor.fit([profiles[src]], "edge")
        for dst in MODELS:
            if dst == src:
                continue
            e = pred.errors(profiles[dst])
            print(f"{src:10} {dst:10} {e['node_median_rel_error']:20.2%} {e['sum_rel_error']:12.2%}")


if __name__ == "__main__":
    main()
