"""`dapdee serve planner`: run the planner under uvicorn."""

from __future__ import annotations

import argparse
import os


def add_serve_command(services: argparse._SubParsersAction) -> None:
    """Register `planner` under `dapdee serve`."""
    p = services.add_parser(
        "planner",
        help="run the planner service (POST /plan, models, profiles, worker registry)",
        description="Settings also come from DAPDEE_* environment variables (DAPDEE_REDIS_URL, "
        "DAPDEE_WORKER_TTL_S, DAPDEE_MAX_BODY_BYTES, DAPDEE_API_TOKEN, DAPDEE_KEY_PREFIX).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--redis-url",
        default=None,
        help="Redis URL, or 'none' for in-process only (default: DAPDEE_REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes (each keeps its own in-process cache; they share Redis)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    if not 0 < args.port < 65536:
        raise ValueError(f"--port: expected 1..65535, got {args.port}")
    overrides = {}
    if args.redis_url is not None:
        overrides["redis_url"] = args.redis_url
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # a bad DAPDEE_* variable
        first = exc.errors()[0]
        field = "DAPDEE_" + ".".join(str(p) for p in first["loc"]).upper()
        raise ValueError(f"planner settings: {field}: {first['msg']}") from None
    if args.workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {args.workers}")
    common = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if args.workers == 1:
        uvicorn.run(create_app(settings), lifespan="on", **common)
        return 0
    if not settings.redis_url:
        raise ValueError("--workers > 1 needs Redis: the worker processes share models through it")
    # several processes: each builds its app from the environment, so pass the overrides there
    if args.redis_url is not None:
        os.environ["DAPDEE_REDIS_URL"] = args.redis_url
    uvicorn.run(
        "dapdee.planner.app:create_app", factory=True, workers=args.workers, lifespan="on", **common
    )
    return 0
