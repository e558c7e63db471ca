"""Loading a service's settings at start-up: a refusal is said in one line that names the
environment variable to fix (pydantic's own message spans several lines and names only the
field)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def load_settings(settings_cls: type[S], what: str, **values: Any) -> S:
    """`settings_cls(**values)`, the rest read from the environment; ValueError from
    `settings_error` when a value or variable is refused."""
    try:
        return settings_cls(**values)
    except ValidationError as exc:
        raise settings_error(exc, settings_cls, what) from None


def settings_error(exc: ValidationError, settings_cls: type[BaseSettings], what: str) -> ValueError:
    """The first error of `exc` (raised building `settings_cls`) as `"{what}: {field}
    ({VARIABLE}): {reason}"`, with how many more there are; a check over several fields (no
    single field) reads `"{what}: {reason}"`. The input value is never repeated: it may be a
    secret. O(errors)."""
    errors = exc.errors()
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"])
    reason = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if not field:
        return ValueError(f"{what}: {reason}{more}")
    name, variable = _names(settings_cls, field)
    return ValueError(f"{what}: {name} ({variable}): {reason}{more}")


def _names(settings_cls: type[BaseSettings], loc: str) -> tuple[str, str]:
    """(field name, environment variable) of the field an error's `loc` names: by its name or by
    one of its aliases (a field with an alias is read from the alias's variable, not the
    prefix's). O(fields)."""
    for name, info in settings_cls.model_fields.items():
        alias = info.validation_alias
        choices = [alias] if isinstance(alias, str) else getattr(alias, "choices", [])
        names = [c for c in choices if isinstance(c, str)]
        if loc == name or loc in names:
            return name, next((c for c in names if c.isupper()), _prefixed(settings_cls, name))
    return loc, _prefixed(settings_cls, loc)


def _prefixed(settings_cls: type[BaseSettings], name: str) -> str:
    return f"{settings_cls.model_config.get('env_prefix', '')}{name}".upper()
