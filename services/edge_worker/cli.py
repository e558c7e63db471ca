"""`dapdee serve edge`: run the edge worker under uvicorn, closed unless opened."""

from __future__ import annotations

import argparse
import logging
import os

from dapdee.web.logs import add_log_arguments, configure_logging, logging_config
from dapdee.web.otel import add_otel_argument

# flag destination -> Settings field (flags override DAPDEE_EDGE_* environment settings)
OVERRIDES = (
    "models",
    "tier",
    "planner_url",
    "public_url",
    "batch_max",
    "batch_wait_ms",
    "max_batch_rows",
    "workers",
    "threads",
    "host",
    "port",
    "slowdown",
    "profile_cache",
    "profile_repeats",
    "request_passes",
    "max_concurrency",
    "max_body_bytes",
    "body_timeout_s",
)


def add_serve_command(services: argparse._SubParsersAction) -> None:
    """Register `edge` under `dapdee serve`."""
    p = services.add_parser(
        "edge",
        help="edge worker: Open Inference Protocol v2 over the split executor",
        description="Serve models for partial inference from any cut to any exit (v2 REST, binary tensors). "
        "Tokens come from DAPDEE_ADMIN_TOKEN / DAPDEE_DEVICE_TOKEN / DAPDEE_WORKER_TOKEN (or DAPDEE_API_TOKEN); "
        "with none, the worker starts only on a loopback host unless --insecure.",
    )
    p.add_argument("--models", help="comma-separated SPEC[@ARTIFACT_DIR] (env DAPDEE_EDGE_MODELS)")
    p.add_argument("--tier", help="hardware tier name for the edge profile (env DAPDEE_EDGE_TIER)")
    p.add_argument("--planner", dest="planner_url", help="planner base URL to register with")
    p.add_argument("--public-url", help="URL devices should use for this worker (default http://HOST:PORT)")
    p.add_argument("--batch-max", type=int, help="max requests per batch (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, help="max wait for a batch to fill")
    p.add_argument("--max-batch-rows", type=int, help="max rows per request and per batch (default 16)")
    p.add_argument("--workers", type=int, help="compute thread pool size (concurrent batches)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--slowdown", type=float, help="emulate an edge K x slower than this machine")
    p.add_argument("--profile-cache", help="directory of cached edge profiles")
    p.add_argument("--profile-repeats", type=int, help="repeats per node when profiling")
    p.add_argument(
        "--request-passes",
        type=int,
        help="bursts behind the start-up whole-frame calibration and request cost (median kept; default 1)",
    )
    p.add_argument("--max-concurrency", type=int, help="requests handled at once (503 + Retry-After beyond)")
    p.add_argument("--max-body-bytes", type=int, help="cap on each model's derived body limit")
    p.add_argument("--body-timeout-s", type=float, help="whole-body read timeout in seconds (408 beyond)")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="run without any token on a non-loopback host (DAPDEE_INSECURE=1)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_log_arguments(p)
    add_otel_argument(p)
    p.set_defaults(func=_serve_edge)


def _serve_edge(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from dapdee.edge_worker.app import OipHeadProtocol, create_app, load_models
    from dapdee.edge_worker.config import Settings, self_url_for
    from dapdee.web.gil import shorten_switch_interval
    from dapdee.web.listen import check_listen
    from dapdee.web.otel import tracer
    from dapdee.web.prometheus import MULTIPROC_ENV
    from dapdee.web.security import check_exposure
    from dapdee.web.settings_load import load_settings

    if os.environ.get(MULTIPROC_ENV, "").strip():  # one process per pod: see dapdee.edge_worker.metrics
        raise ValueError(
            f"{MULTIPROC_ENV} is set, but the edge worker runs as one process with its own metrics "
            "registry (prometheus_client's multiprocess mode is for `dapdee serve planner --workers N`): "
            "unset it; scale edge workers out as more pods or processes on their own ports"
        )
    overrides = {k: getattr(args, k) for k in (*OVERRIDES, "insecure") if getattr(args, k) is not None}
    settings = load_settings(Settings, "edge worker settings", **overrides)  # a flag sets the same field
    if settings.self_url is None:  # where it measures its own per-request cost (request_cost.py)
        settings = settings.model_copy(update={"self_url": self_url_for(settings.host, settings.port)})
    configure_logging("edge", args.log_format, args.log_level)  # one JSON (or text) line per record on stderr
    warning = check_exposure("edge worker", settings.host, settings.tokens(), settings.insecure)  # ValueError: exit 2
    check_listen(settings.host, settings.port)  # before the models load
    if warning:
        logging.getLogger("dapdee.edge").warning(warning)
    if settings.threads:  # process-wide: set by the process's entry point, not by the app
        torch.set_num_threads(settings.threads)
    models = load_models(settings)
    shorten_switch_interval()  # the compute thread and the event loop hand the GIL over quickly
    tracing = tracer("edge", enabled=args.otel)  # ValueError (exit 2) when asked for without the SDK
    app = create_app(settings, models, tracing=tracing)
    try:  # uvicorn logs through our handler; the access log is the app's own (AccessLog)
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            log_config=logging_config("edge", args.log_format, args.log_level),
            access_log=False,
            proxy_headers=False,  # the access log's `client` is the peer: no loopback process may forge it
            http=OipHeadProtocol,  # a bounded request head, before the guard sees the request
        )
    finally:
        tracing.shutdown()
    return 0
