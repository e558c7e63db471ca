"""`dapdee serve planner`: run the planner under uvicorn (closed unless opened: see `--insecure`)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from dapdee.web.logs import add_log_arguments, configure_logging, logging_config
from dapdee.web.otel import add_otel_argument

# uvicorn's wait for requests in progress at shutdown; then the lifespan replays queued writes
# (CLOSE_DRAIN_S) and closes Redis (REDIS_CLOSE_S): a deployment's grace period must cover all three
GRACEFUL_SHUTDOWN_S = 10


def add_serve_command(services: argparse._SubParsersAction) -> None:
    """Register `planner` under `dapdee serve`."""
    p = services.add_parser(
        "planner",
        help="run the planner service (POST /plan, models, profiles, worker registry)",
        description="Settings also come from DAPDEE_* environment variables: the role tokens "
        "DAPDEE_ADMIN_TOKEN, DAPDEE_DEVICE_TOKEN, DAPDEE_WORKER_TOKEN (DAPDEE_API_TOKEN grants all "
        "three), DAPDEE_REDIS_URL, DAPDEE_KEY_PREFIX, DAPDEE_WORKER_TTL_S, DAPDEE_WORKER_URL_PATTERN, "
        "DAPDEE_MAX_BODY_BYTES, DAPDEE_MAX_CONCURRENCY, DAPDEE_PLAN_BUDGET_S, DAPDEE_MAX_NODES; "
        "PROMETHEUS_MULTIPROC_DIR for --workers N (its *.db files are deleted at start). "
        "Without a token the planner starts only on a loopback address (or with --insecure).",
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
        help="uvicorn worker processes (each keeps its own in-process cache; they share Redis; /metrics "
        "merges them through PROMETHEUS_MULTIPROC_DIR, a fresh temporary directory unless set)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow running without any token on a non-loopback address (DAPDEE_INSECURE=1)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_log_arguments(p)
    add_otel_argument(p)
    p.set_defaults(func=_serve)


def _settings(overrides: dict[str, Any]) -> Any:
    """Settings from the environment plus `overrides`; ValueError naming the bad variable."""
    from dapdee.planner.config import Settings
    from dapdee.web.settings_load import load_settings

    return load_settings(Settings, "planner settings", **overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dapdee.planner.app import create_app
    from dapdee.planner.problems import ProblemHeadProtocol
    from dapdee.web.gil import shorten_switch_interval
    from dapdee.web.listen import check_listen
    from dapdee.web.otel import tracer
    from dapdee.web.prometheus import MULTIPROC_ENV, shared_directory
    from dapdee.web.security import check_exposure

    if not 0 < args.port < 65536:
        raise ValueError(f"--port: expected 1..65535, got {args.port}")
    if args.workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {args.workers}")
    overrides: dict[str, Any] = {}
    if args.redis_url is not None:
        overrides["redis_url"] = args.redis_url
    if args.insecure:
        overrides["insecure"] = True
    settings = _settings(overrides)
    configure_logging("planner", args.log_format, args.log_level)  # one JSON (or text) line per record on stderr
    # closed unless opened: no token beyond loopback is refused (exit 2) unless --insecure; the
    # app itself logs the "runs open" warning at start-up
    check_exposure("planner", args.host, settings.tokens(), settings.insecure)
    check_listen(args.host, args.port)
    common = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "access_log": False,  # the app's AccessLog writes one record per request
        "proxy_headers": False,  # the access log's `client` is the peer: no loopback process may forge it
        "log_config": logging_config("planner", args.log_format, args.log_level),  # each worker process too
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "http": ProblemHeadProtocol,  # a bounded request head, before the guard sees the request
    }
    if args.workers == 1:
        shorten_switch_interval()  # min-cut and rebalance threads hand the GIL back quickly (one process)
        if os.environ.get(MULTIPROC_ENV, "").strip():  # multiprocess mode asked for by hand: start clean
            shared_directory(os.environ[MULTIPROC_ENV])
        tracing = tracer("planner", enabled=args.otel)  # ValueError (exit 2) when asked for without the SDK
        try:
            uvicorn.run(create_app(settings, tracing=tracing), lifespan="on", **common)
        finally:
            tracing.shutdown()
        return 0
    return _serve_workers(args, settings, common)


def _serve_workers(args: argparse.Namespace, settings: Any, common: dict[str, Any]) -> int:
    """Run `args.workers` uvicorn worker processes. They share Redis and, for /metrics,
    prometheus_client's multiprocess directory: PROMETHEUS_MULTIPROC_DIR when set (its `*.db`
    files are deleted first), else a fresh temporary directory removed at exit."""
    import shutil

    import uvicorn

    from dapdee.web.prometheus import MULTIPROC_ENV, shared_directory

    if not settings.redis_url:
        raise ValueError("--workers > 1 needs Redis: the worker processes share models through it")
    # several processes: each builds its app from the environment, so pass the overrides there
    if args.redis_url is not None:
        os.environ["DAPDEE_REDIS_URL"] = args.redis_url
    if args.insecure:
        os.environ["DAPDEE_INSECURE"] = "1"
    if args.otel:  # each process's app turns tracing on from the endpoint variable (OTLP's default port)
        os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    path, created = shared_directory(os.environ.get(MULTIPROC_ENV))
    os.environ[MULTIPROC_ENV] = path  # read by prometheus_client when each worker process imports it
    logging.getLogger("dapdee.planner").info("%d worker processes; metrics shared in %s", args.workers, path)
    try:
        uvicorn.run("dapdee.planner.app:create_app", factory=True, workers=args.workers, lifespan="on", **common)
    finally:
        if created:
            shutil.rmtree(path, ignore_errors=True)
    return 0
