"""Planner settings (pydantic-settings, environment prefix `DAPDEE_`)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the planner reads from its environment; `DAPDEE_REDIS_URL=none` (or empty) runs
    in-process only."""

    model_config = SettingsConfigDict(env_prefix="DAPDEE_", extra="ignore")

    redis_url: str | None = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("dapdee", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    worker_ttl_s: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    api_token: str | None = None
    # Redis client behaviour: short timeouts so a dead Redis never stalls a request, and a
    # back-off between reconnect attempts.
    redis_timeout_s: float = Field(0.3, gt=0)
    redis_backoff_s: float = Field(1.0, gt=0)
    # How often a replica re-reads the shared generation counter and the worker registry.
    refresh_s: float = Field(1.0, gt=0)
    planmap_cache_size: int = Field(64, ge=1)
    planmap_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    planmap_cap: int | None = None  # enumeration cap handed to PlanMap.build (None: its default)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _none_url(cls, v: object) -> object:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none")):
            return None
        return v

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token(cls, v: object) -> object:
        if isinstance(v, str) and not v:
            return None
        return v
