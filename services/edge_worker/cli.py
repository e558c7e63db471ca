"""`dapdee serve edge`: run the edge worker under uvicorn."""

from __future__ import annotations

import argparse
import logging


def add_serve_command(services: argparse._SubParsersAction) -> None:
    """Register `edge` under `dapdee serve`. Flags override DAPDEE_EDGE_* environment settings."""
    p = services.add_parser(
        "edge",
        help="edge worker: Open Inference Protocol v2 over the split executor",
        description="Serve models for partial inference from any cut to any exit (v2 REST, binary tensors).",
    )
    p.add_argument("--models", help="comma-separated SPEC[@ARTIFACT_DIR] (env DAPDEE_EDGE_MODELS)")
    p.add_argument("--tier", help="hardware tier name for the edge profile (env DAPDEE_EDGE_TIER)")
    p.add_argument("--planner", dest="planner_url", help="planner base URL to register with")
    p.add_argument("--public-url", help="URL devices should use for this worker (default http://HOST:PORT)")
    p.add_argument("--batch-max", type=int, help="max requests per batch (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, help="max wait for a batch to fill")
    p.add_argument("--workers", type=int, help="compute thread pool size (concurrent batches)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--slowdown", type=float, help="emulate an edge K x slower than this machine")
    p.add_argument("--profile-cache", help="directory of cached edge profiles")
    p.add_argument("--profile-repeats", type=int, help="repeats per node when profiling")
    p.add_argument("--max-inflight", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve_edge)


def _serve_edge(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from dapdee.edge_worker.app import create_app, load_models
    from dapdee.edge_worker.config import Settings

    keys = (
        "models",
        "tier",
        "planner_url",
        "public_url",
        "batch_max",
        "batch_wait_ms",
        "workers",
        "threads",
        "host",
        "port",
        "slowdown",
        "profile_cache",
        "profile_repeats",
        "max_inflight",
        "max_body_bytes",
    )
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    models = load_models(settings)
    uvicorn.run(
        create_app(settings, models), host=settings.host, port=settings.port, log_level=args.log_level
    )
    return 0
