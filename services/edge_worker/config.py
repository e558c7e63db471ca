"""Edge worker settings: its own fields under the environment prefix `DAPDEE_EDGE_`; the role
tokens (`DAPDEE_ADMIN_TOKEN`, `DAPDEE_DEVICE_TOKEN`, `DAPDEE_WORKER_TOKEN`, fallback
`DAPDEE_API_TOKEN`) and `DAPDEE_INSECURE` are the names every service reads."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from dapdee.api.planner import Name
from dapdee.client.transport import check_base_url
from dapdee.edge_worker.batching import STARVE_MS
from dapdee.web.settings import GuardSettings

WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # bind every interface: no address to advertise
LOOPBACK_V4 = ("0.0.0.0", "127.0.0.1", "localhost", "")  # the worker reaches itself at 127.0.0.1
LOOPBACK_V6 = ("::", "::1")  # ... and at [::1] (reachable whether or not "::" is dual-stack)


def http_url(host: str, port: int) -> str:
    """`http://HOST:PORT`, an IPv6 literal in brackets (`::1` -> `http://[::1]:8000`; a host
    already bracketed stays so), checked as the SDK takes base URLs (`check_base_url`: a
    RequestError, a ValueError, naming the URL otherwise). O(len(host))."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return check_base_url(f"http://[{bare}]:{port}" if ":" in bare else f"http://{bare}:{port}")


def self_url_for(host: str, port: int) -> str:
    """Where a worker bound to `host`:`port` reaches its own server: loopback for a wildcard or
    loopback host (`http://127.0.0.1:PORT` for IPv4 ones, `http://[::1]:PORT` for IPv6 ones),
    else the host itself (`http_url`). O(len(host))."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare in LOOPBACK_V4:
        return http_url("127.0.0.1", port)
    if bare in LOOPBACK_V6:
        return http_url("::1", port)
    return http_url(bare, port)


class Settings(GuardSettings):
    """Everything the worker reads at start-up. `models` is a comma-separated list of
    `SPEC[@ARTIFACT_DIR]` (e.g. `zoo:resnet18@artifacts/fmnist-resnet18,zoo:vgg16?width=0.25`)."""

    # no infinite settings: an `inf` slowdown or period passes every lower bound, then breaks at run time
    model_config = SettingsConfigDict(env_prefix="DAPDEE_EDGE_", extra="ignore", allow_inf_nan=False)

    models: str = "zoo:resnet18"
    tier: Name = Field(default="edge", description="the profile tier it registers (a model-name-like name)")
    planner_url: str | None = Field(
        default=None, description="planner base URL to register with, http(s)://HOST[:PORT][/PATH] (unset: none)"
    )
    public_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    batch_max: int = Field(default=8, ge=1, le=1024, description="most requests per batch")
    batch_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    batch_starve_ms: float = Field(
        default=STARVE_MS,
        gt=0.0,
        le=60_000.0,
        description="a due batch whose first request has waited this long is taken before full batches",
    )
    max_batch_rows: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="most rows (first dimension) per request and per batch; with the model's "
        "largest boundary set it bounds a request's values and body",
    )
    max_body_bytes: int = Field(
        default=16 << 20, ge=1024, description="cap on the body limit derived per model from max_batch_rows"
    )
    max_concurrency: int = Field(
        default=32, ge=1, le=65536, description="requests handled at once (503 + Retry-After beyond)"
    )
    max_buffered_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="request body bytes held at once across requests (being received or handled); "
        "503 + Retry-After beyond (unset: max_body_bytes x min(max_concurrency + 1, 4))",
    )
    workers: int = Field(default=1, ge=1, le=64, description="compute thread pool size")
    threads: int | None = Field(default=None, ge=1, le=256, description="torch threads (`dapdee serve` sets them)")
    slowdown: float = Field(default=1.0, ge=1.0, description="emulate an edge K x slower (compute is stretched)")
    profile: bool = Field(default=True, description="profile at start-up when registering with a planner")
    profile_repeats: int = Field(default=20, ge=1)
    profile_warmup: int = Field(default=3, ge=0)
    request_samples: int = Field(
        default=50,
        ge=0,
        le=10_000,
        description="batch-1 requests the worker sends itself to measure its per-request cost (0: don't)",
    )
    # the host's speed drifts for seconds to minutes: one burst can price every frame from a slow spell
    request_passes: int = Field(
        default=1,
        ge=1,
        le=20,
        description="bursts of request_samples behind the whole-frame calibration and the request cost, "
        "request_pass_pause_s apart; the median burst of each is kept",
    )
    request_pass_pause_s: float = Field(default=1.0, ge=0.0, le=60.0, description="pause between those bursts")
    self_url: str | None = Field(
        default=None,
        description="where the worker reaches its own server for that measurement (`dapdee serve edge` "
        "sets it from --host/--port; unset: not measured)",
    )
    profile_cache: str | None = Field(default=None, description="directory of cached profiles (read, else written)")
    heartbeat_s: float = Field(default=5.0, gt=0.0)
    # the heartbeat's capacity_ms_per_s: nominal / (what requests take / what leases book for them)
    capacity_window_s: float = Field(default=20.0, gt=0.0, description="window of the capacity measurement")
    # a tenth of one slot over the default window: a lighter window is mostly start-up traffic
    capacity_min_ms: float = Field(
        default=2000.0, ge=0.0, description="priced ms (nodes + request cost) the window must hold before it counts"
    )
    capacity_max_factor: float = Field(default=4.0, ge=1.0, description="most the capacity is divided by")
    capacity_hysteresis: float = Field(
        default=0.2, ge=0.0, description="relative move of the measured slowdown that changes the advertised one"
    )
    capacity_raise_after_s: float = Field(
        default=60.0, ge=0.0, description="the advertised capacity rises only after the relief has lasted this long"
    )
    planner_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)

    @field_validator("planner_url", "public_url", "self_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        """The planner URL, the URL devices reach this worker at and the one it reaches itself
        at, as the SDK takes them (`check_base_url`: http(s) with a host, no query, fragment or
        credentials; trailing slash dropped), so a bad one fails at start-up rather than in the
        registration task or on every device; empty means none."""
        return check_base_url(v) if v else None

    @model_validator(mode="after")
    def _advertised(self) -> Settings:
        """A worker that registers must know the URL it tells the planner: port 0 (a free port
        picked at bind time, after start-up) is never known to it, and a wildcard host (0.0.0.0,
        ::) is no address a device can reach, so such a worker needs `public_url`; port 0 is
        refused outright, as the worker also measures its own request cost through that port. The
        URL it advertises without `public_url` is `advertised_url()`, checked here."""
        if self.planner_url is None:
            return self
        if self.port == 0:
            raise ValueError(
                "port: 0 (a free port picked at bind time) cannot be registered with a planner; give a fixed port"
            )
        if self.public_url is None and self.host in WILDCARD_HOSTS:
            raise ValueError(
                f"public_url: needed with host {self.host!r}, which is no address a device can reach "
                "(the worker registers http://HOST:PORT otherwise)"
            )
        if self.public_url is None:
            try:
                http_url(self.host, self.port)
            except ValueError as exc:
                raise ValueError(f"host: {self.host!r} gives no URL to advertise ({exc}); give public_url") from None
        return self

    def advertised_url(self) -> str:
        """The URL the worker registers with the planner: `public_url`, else
        `http://HOST:PORT` (`http_url`: an IPv6 literal host bracketed). O(len(host))."""
        return self.public_url or http_url(self.host, self.port)

    def model_entries(self) -> list[tuple[str, str | None]]:
        """`models` as (spec, artifact dir or None) pairs."""
        out = []
        for item in self.models.split(","):
            item = item.strip()
            if not item:
                continue
            spec, sep, artifact = item.partition("@")
            if sep and not artifact:
                raise ValueError(f"models: {item!r} has '@' but no artifact directory")
            out.append((spec, artifact or None))
        if not out:
            raise ValueError("models: give at least one model spec")
        return out
