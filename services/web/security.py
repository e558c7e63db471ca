"""Roles, bearer tokens and who may call which route.

Each service knows three roles, each with its own token: `device` (plans, inference),
`worker` (edge-worker heartbeats) and `admin` (models, profiles, deletes, rebalancing).
A route declares the roles it accepts with `require(access)`; a route that declares nothing
is admin-only, so a forgotten declaration fails closed. With no token configured at all the
service runs open, which `check_exposure` allows only on a loopback address (or when the
operator says `--insecure`).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPBearer

AUTH_SCOPE_KEY = "dapdee.roles"  # set by the guard: the roles the request's token holds
MIN_TOKEN_CHARS = 16  # a configured token's least length (generated ones: 43, `deploy/gen_secrets.py`)


class Role(str, Enum):
    ADMIN = "admin"
    DEVICE = "device"
    WORKER = "worker"


@dataclass(frozen=True)
class Access:
    """Who may call a route: anyone (`public`), or a token holding one of `roles`."""

    roles: frozenset[Role]
    public: bool = False

    def describe(self) -> str:
        return "public" if self.public else " or ".join(sorted(r.value for r in self.roles))


PUBLIC = Access(frozenset(), public=True)
ANY_ROLE = Access(frozenset(Role))
ADMIN = Access(frozenset({Role.ADMIN}))
DEVICE = Access(frozenset({Role.DEVICE}))
WORKER = Access(frozenset({Role.WORKER}))
DEVICE_OR_ADMIN = Access(frozenset({Role.DEVICE, Role.ADMIN}))
DEFAULT_ACCESS = ADMIN  # a route that declares nothing


@dataclass(frozen=True)
class AuthFailure:
    """Why a request may not proceed: 401 (no or unknown token) or 403 (wrong role)."""

    status: int
    reason: str  # unauthenticated | forbidden (a metrics label)
    message: str

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}


@dataclass(frozen=True)
class TokenSet:
    """The configured tokens and the roles each grants (a fallback token may grant all three)."""

    grants: tuple[tuple[bytes, frozenset[Role]], ...] = field(repr=False)  # secrets: never in logs

    @classmethod
    def of(
        cls,
        admin: str | None = None,
        device: str | None = None,
        worker: str | None = None,
        all_roles: str | None = None,
    ) -> TokenSet:
        """Tokens per role; `all_roles` (the legacy single API token) grants every role."""
        pairs = [(admin, {Role.ADMIN}), (device, {Role.DEVICE}), (worker, {Role.WORKER}), (all_roles, set(Role))]
        return cls(tuple((t.encode(), frozenset(r)) for t, r in pairs if t))

    @property
    def open(self) -> bool:
        """True when no token is configured: every route is callable without one."""
        return not self.grants

    def roles_of(self, token: str) -> frozenset[Role] | None:
        """The roles `token` holds (None: not a configured token). Compares against every
        configured token in constant time each, so timing does not say which one matched. O(#tokens)."""
        given = token.encode()
        roles: frozenset[Role] = frozenset()
        matched = False
        for secret, granted in self.grants:
            if hmac.compare_digest(given, secret):
                roles |= granted
                matched = True
        return roles if matched else None


def token_problem(token: str) -> str | None:
    """Why `token` cannot be a configured bearer token (None: it can), without repeating it.
    A token travels in an `Authorization` header: only visible ASCII (letters, digits,
    punctuation) can arrive intact and be matched; whitespace, control characters (a trailing
    newline from a secret file) or non-ASCII ones never match, or smuggle header syntax.
    O(len(token))."""
    for i, ch in enumerate(token):
        if "!" <= ch <= "~":
            continue
        if ch.isspace():
            what = "whitespace" if 0 < i < len(token) - 1 else "leading or trailing whitespace (a trailing newline?)"
        elif not ch.isascii():
            what = "a non-ASCII character"
        else:
            what = "a control character"
        return f"has {what}; only visible ASCII characters (letters, digits, punctuation) can be sent in a header"
    if len(token) < MIN_TOKEN_CHARS:
        return f"has {len(token)} characters, fewer than the {MIN_TOKEN_CHARS} a token needs"
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (None when absent or another scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authorize(tokens: TokenSet, access: Access, authorization: str | None) -> frozenset[Role] | AuthFailure:
    """The roles the request may act with, or why it may not proceed. Open services and public
    routes admit everyone (with no roles). O(#tokens)."""
    if tokens.open or access.public:
        return frozenset()
    token = bearer_token(authorization)
    if token is None:
        return AuthFailure(401, "unauthenticated", "missing bearer token (Authorization: Bearer TOKEN)")
    roles = tokens.roles_of(token)
    if roles is None:
        return AuthFailure(401, "unauthenticated", "unknown bearer token")
    if not roles & access.roles:
        held = ", ".join(sorted(r.value for r in roles))
        return AuthFailure(403, "forbidden", f"this route needs the {access.describe()} role; the token holds {held}")
    return roles


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals (127.0.0.0/8, ::1); other names count as exposed."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(service: str, host: str, tokens: TokenSet, insecure: bool) -> str | None:
    """Closed unless opened: raises ValueError when a service with no token would listen beyond
    loopback without `insecure`; returns the warning to log when it runs open (None: closed)."""
    if not tokens.open:
        return None
    if not is_loopback(host) and not insecure:
        raise ValueError(
            f"{service}: no token is configured and --host {host} is not a loopback address; set "
            "DAPDEE_ADMIN_TOKEN, DAPDEE_DEVICE_TOKEN and DAPDEE_WORKER_TOKEN (or DAPDEE_API_TOKEN), "
            "bind to 127.0.0.1, or pass --insecure (DAPDEE_INSECURE=1) to run open on purpose"
        )
    where = "on loopback only" if is_loopback(host) else f"on {host} (--insecure)"
    return f"{service} runs OPEN {where}: no token is configured, so every route is callable without one"


async def enforce(request: Request, access: Access) -> None:
    """Check `access` for a request the guard did not see (an app mounted without it); the
    guard records the roles it admitted in the scope, and then this is a dict look-up. O(#tokens)."""
    if AUTH_SCOPE_KEY in request.scope:
        return
    outcome = authorize(request.app.state.tokens, access, request.headers.get("authorization"))
    if isinstance(outcome, AuthFailure):
        raise HTTPException(outcome.status, outcome.message, headers=outcome.headers)


def require(access: Access) -> Any:
    """`dependencies=[require(DEVICE)]`: the roles a route accepts. The guard reads it before the
    body is parsed; OpenAPI shows it as bearer security (public routes show none)."""
    if access.public:

        async def public_route() -> None:
            return None

        public_route.access = access  # type: ignore[attr-defined]
        return Depends(public_route)
    return Security(_RoleBearer(access))


class _RoleBearer(HTTPBearer):
    """The route dependency `require` returns for a protected route: a bearer security scheme
    (so OpenAPI shows it) whose call checks `access` (one dependency, no sub-dependency)."""

    def __init__(self, access: Access) -> None:
        description = f"a token of the {access.describe()} role"
        super().__init__(scheme_name="HTTPBearer", auto_error=False, description=description)
        self.access = access

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        await enforce(request, self.access)


def declared_access(dependencies: Iterable[Any]) -> Access | None:
    """The `Access` a route's dependencies declare through `require` (None: none declared). O(deps)."""
    for dep in dependencies:
        access = getattr(getattr(dep, "dependency", None), "access", None)
        if isinstance(access, Access):
            return access
    return None
