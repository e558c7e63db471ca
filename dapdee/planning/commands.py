"""`dapdee plan`: print the plan JSON for a cost graph and run-time conditions."""

from __future__ import annotations

import argparse
import json
import sys


def add_commands(sub: argparse._SubParsersAction) -> None:
    from dapdee.cli import float_in
    from dapdee.planning.baselines import BASELINES
    from dapdee.planning.request import (
        MAX_BANDWIDTH_MBPS,
        MAX_BUDGET_MS,
        MAX_FRAME_RATE,
        MAX_RTT_MS,
        MIN_BANDWIDTH_MBPS,
        MODES,
    )

    p = sub.add_parser("plan", help="plan exit + device/edge partition for a profile (prints plan JSON)")
    p.add_argument("--profile", required=True, help="cost graph JSON with device and edge timings")
    p.add_argument(
        "--bandwidth-mbps", type=float_in(MIN_BANDWIDTH_MBPS, MAX_BANDWIDTH_MBPS), required=True, help="uplink Mbit/s"
    )
    p.add_argument("--rtt-ms", type=float_in(0.0, MAX_RTT_MS), default=0.0, help="round trip ms")
    p.add_argument("--device-load", type=float, default=0.0, help="device load in [0, 1)")
    p.add_argument("--edge-load", type=float, default=0.0, help="edge load in [0, 1)")
    p.add_argument("--latency-budget-ms", type=float_in(0.0, MAX_BUDGET_MS, low_open=True), default=None)
    p.add_argument("--min-accuracy", type=float, default=None)
    p.add_argument(
        "--frame-rate", type=float_in(0.0, MAX_FRAME_RATE, low_open=True), default=None, help="frames/s to sustain"
    )
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--baseline", choices=BASELINES, default=None, help="plan with a baseline instead of DAPDEE")
    p.add_argument("--cap", type=int, default=None, help="max downward-closed sets enumerated per exit")
    p.add_argument(
        "--confidence-exits",
        action="store_true",
        help="price by expected cost under the profile's calibrated confidence exits (its `progressive` field)",
    )
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Load the profile, validate the request, print the plan JSON. User errors raise ValueError."""
    from dapdee.costgraph import CostGraph
    from dapdee.planning import DEFAULT_CAP, PlanRequest, baseline_plan
    from dapdee.planning.progressive import plan as progressive_plan

    req = PlanRequest(
        bandwidth_mbps=args.bandwidth_mbps,
        rtt_ms=args.rtt_ms,
        device_load=args.device_load,
        edge_load=args.edge_load,
        latency_budget_ms=args.latency_budget_ms,
        min_accuracy=args.min_accuracy,
        frame_rate=args.frame_rate,
        mode=args.mode,
        confidence_exits=args.confidence_exits,
    )
    req.validate()
    if args.baseline and args.confidence_exits:
        raise ValueError("--confidence-exits: the baselines plan without confidence exits; drop --baseline")
    graph = CostGraph.load(args.profile)
    graph.require_timings()
    if args.baseline:
        plan = baseline_plan(graph, req, args.baseline)
    else:
        plan = progressive_plan(graph, req, args.cap if args.cap is not None else DEFAULT_CAP)
    json.dump(plan, sys.stdout, indent=1, allow_nan=False)  # strict JSON: the bounds keep numbers finite
    sys.stdout.write("\n")
    return 0
