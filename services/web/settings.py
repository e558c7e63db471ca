"""Settings both services read for their security and their request guard: the role tokens (the
same environment names for every service, whatever its own prefix), whether running open beyond
loopback is allowed, and the guard's limits (under each service's own prefix)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dapdee.web.guard import check_buffered_bytes
from dapdee.web.security import TokenSet, token_problem

SECURITY_FIELDS = ("admin_token", "device_token", "worker_token", "api_token", "insecure")
TOKEN_FIELDS = ("admin_token", "device_token", "worker_token", "api_token")  # each a distinct secret


def _env(name: str) -> str:
    """The one environment name of a security field, `DAPDEE_{NAME}`, for every service. (Not
    also the bare field name: a stray `INSECURE=1` or `API_TOKEN` must not open a service.)"""
    return f"DAPDEE_{name.upper()}"


def _same_token(first: str, second: str) -> str:
    """Why fields `first` and `second` (in `TOKEN_FIELDS` order) may not hold the same token,
    naming both environment variables and never the token."""
    if second == "api_token":
        why = f"ambiguous: {_env(second)} grants every role, {_env(first)} one"
    else:
        why = "whoever holds either would hold both roles"
    return f"{_env(first)} and {_env(second)} hold the same token ({why}); give each its own token"


class SecuritySettings(BaseSettings):
    """Role tokens (`DAPDEE_ADMIN_TOKEN`, `DAPDEE_DEVICE_TOKEN`, `DAPDEE_WORKER_TOKEN`;
    `DAPDEE_API_TOKEN` grants all three) and `DAPDEE_INSECURE`. A service subclasses this;
    its own settings keep their own prefix. A token must be at least `MIN_TOKEN_CHARS` visible
    ASCII characters (see `token_problem`); an empty one is none. No two of the four may hold
    the same token (`_distinct_tokens`): a device token equal to the admin token would make every
    device an admin, and `DAPDEE_API_TOKEN` equal to a role token is ambiguous (one role or all
    three?), so both are refused at start-up. No settings error repeats the value it refuses (it
    may be a secret); subclasses inherit that."""

    model_config = SettingsConfigDict(hide_input_in_errors=True)

    admin_token: SecretStr | None = Field(None, validation_alias=_env("admin_token"))
    device_token: SecretStr | None = Field(None, validation_alias=_env("device_token"))
    worker_token: SecretStr | None = Field(None, validation_alias=_env("worker_token"))
    api_token: SecretStr | None = Field(None, validation_alias=_env("api_token"))
    insecure: bool = Field(False, validation_alias=_env("insecure"))

    @field_validator("admin_token", "device_token", "worker_token", "api_token", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("admin_token", "device_token", "worker_token", "api_token")
    @classmethod
    def _sendable(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """A token a client can send in a header and the guard can match; ValueError naming
        its environment variable (never the value) otherwise. O(len(token))."""
        if v is None:
            return None
        problem = token_problem(v.get_secret_value())
        if problem is not None:
            raise ValueError(f"the token in DAPDEE_{str(info.field_name).upper()} {problem}")
        return v

    @model_validator(mode="after")
    def _distinct_tokens(self) -> SecuritySettings:
        """The settings unchanged when no two configured tokens are equal; ValueError naming the
        first two environment variables that share one (never the value) otherwise, since the
        guard grants a token every role it is configured for. `DAPDEE_API_TOKEN` is refused
        as well when it equals a role token: whether that role alone or all three were meant is
        ambiguous. O(total length of the tokens)."""
        seen: dict[str, str] = {}  # token -> the first field holding it
        for name in TOKEN_FIELDS:
            secret: SecretStr | None = getattr(self, name)
            if secret is None:
                continue
            first = seen.setdefault(secret.get_secret_value(), name)
            if first != name:
                raise ValueError(_same_token(first, name))
        return self

    def __init__(self, **values: Any) -> None:
        """Settings from the environment, overridden by `values`, which may name a security
        field by its field name (`insecure=True`, as the command line and tests do): mapped to its
        environment name here, since pydantic-settings would read the bare field name from the
        environment too if the model allowed it by name."""
        for name in SECURITY_FIELDS:
            if name in values:
                values[_env(name)] = values.pop(name)
        super().__init__(**values)

    def tokens(self) -> TokenSet:
        """The configured tokens as a `TokenSet`. O(1)."""

        def raw(s: SecretStr | None) -> str | None:
            return s.get_secret_value() if s is not None else None

        return TokenSet.of(raw(self.admin_token), raw(self.device_token), raw(self.worker_token), raw(self.api_token))


class GuardSettings(SecuritySettings):
    """`SecuritySettings` and the request guard's limits (`dapdee.web.guard.RequestGuard`), read
    under the service's own environment prefix. The defaults suit a service of small JSON bodies;
    a service with other needs redeclares a field with its own default and bounds (the checks
    below still apply; the field keeps its place here, so with several bad settings the first
    refusal may name a guard field before the service's own)."""

    max_body_bytes: int = Field(2 * 1024 * 1024, gt=0, description="413 past it")
    body_timeout_s: float = Field(10.0, gt=0, le=3600, description="408 when a whole body takes longer")
    max_concurrency: int = Field(256, ge=1, description="requests handled at once; 503 + Retry-After past it")
    max_buffered_bytes: int | None = Field(
        None,
        ge=1,
        description="request body bytes held at once across requests (being received or handled); "
        "503 + Retry-After past it (unset: max_body_bytes x min(max_concurrency + 1, 4))",
    )

    @field_validator("max_buffered_bytes")
    @classmethod
    def _holds_a_body(cls, v: int | None, info: ValidationInfo) -> int | None:
        """At least `max_body_bytes`: a body within the limit must fit the buffer."""
        return check_buffered_bytes(v, info.data.get("max_body_bytes"))
