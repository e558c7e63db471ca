"""Settings both services read for their security: the role tokens (the same environment names
for every service, whatever its own prefix) and whether running open beyond loopback is allowed."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dapdee.web.security import TokenSet, token_problem

SECURITY_FIELDS = ("admin_token", "device_token", "worker_token", "api_token", "insecure")


def _env(name: str) -> str:
    """The one environment name of a security field, `DAPDEE_{NAME}`, for every service. (Not
    also the bare field name: a stray `INSECURE=1` or `API_TOKEN` must not open a service.)"""
    return f"DAPDEE_{name.upper()}"


class SecuritySettings(BaseSettings):
    """Role tokens (`DAPDEE_ADMIN_TOKEN`, `DAPDEE_DEVICE_TOKEN`, `DAPDEE_WORKER_TOKEN`;
    `DAPDEE_API_TOKEN` grants all three) and `DAPDEE_INSECURE`. A service subclasses this;
    its own settings keep their own prefix. A token must be at least `MIN_TOKEN_CHARS` visible
    ASCII characters (see `token_problem`); an empty one is none. No settings error repeats the
    value it refuses (it may be a secret); subclasses inherit that."""

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
