"""Each role's token is its own: settings that give two roles (or a role and the all-roles
`DAPDEE_API_TOKEN`) the same token are refused at start-up, naming both variables and never the
token, so no device ends up holding admin because an operator pasted one secret twice."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dapdee.edge_worker.config import Settings as EdgeSettings
from dapdee.planner.config import Settings as PlannerSettings
from dapdee.web.security import Role
from dapdee.web.settings_load import load_settings

SHARED = "one-secret-pasted-twice-0123456789"  # what must never be repeated in an error
TOKEN_FIELDS = ("admin_token", "device_token", "worker_token", "api_token")
PAIRS = list(itertools.combinations(TOKEN_FIELDS, 2))
BASE: dict[type[Any], dict[str, Any]] = {PlannerSettings: {"redis_url": None}, EdgeSettings: {"models": ""}}


def _variable(field: str) -> str:
    """The environment variable a token field is read from."""
    return f"DAPDEE_{field.upper()}"


def _distinct(fields: tuple[str, ...]) -> dict[str, str]:
    """A different valid token for each of `fields`."""
    return {f: f"{f}-distinct-0123456789" for f in fields}


@pytest.mark.parametrize("settings_cls", [PlannerSettings, EdgeSettings])
@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_two_fields_with_the_same_token_are_refused_naming_both_variables(
    settings_cls: type[Any], first: str, second: str
) -> None:
    """Any two token fields holding one value, the other two distinct: a validation error that
    names both environment variables and repeats neither the token nor any other one."""
    others = _distinct(tuple(f for f in TOKEN_FIELDS if f not in (first, second)))
    with pytest.raises(ValidationError) as refused:
        settings_cls(**BASE[settings_cls], **{first: SHARED, second: SHARED}, **others)
    text = str(refused.value)
    assert _variable(first) in text and _variable(second) in text, text
    assert "same token" in text, text
    assert all(secret not in text for secret in (SHARED, *others.values())), text


def test_the_error_says_why_for_a_role_pair_and_for_the_api_token() -> None:
    """Two roles sharing a token: the reason is that either holder holds both roles; a role token
    equal to `DAPDEE_API_TOKEN`: the reason is that which one was meant is ambiguous."""
    with pytest.raises(ValidationError, match="would hold both roles"):
        PlannerSettings(redis_url=None, device_token=SHARED, admin_token=SHARED)
    with pytest.raises(ValidationError, match="ambiguous: DAPDEE_API_TOKEN grants every role"):
        PlannerSettings(redis_url=None, worker_token=SHARED, api_token=SHARED)


def test_distinct_tokens_are_accepted_and_grant_one_role_each() -> None:
    """Four different tokens (and any subset of them) start, and each grants only its roles."""
    tokens = _distinct(TOKEN_FIELDS)
    settings = PlannerSettings(redis_url=None, **tokens)
    granted = settings.tokens()
    assert granted.roles_of(tokens["admin_token"]) == {Role.ADMIN}
    assert granted.roles_of(tokens["device_token"]) == {Role.DEVICE}
    assert granted.roles_of(tokens["worker_token"]) == {Role.WORKER}
    assert granted.roles_of(tokens["api_token"]) == set(Role)
    for field in TOKEN_FIELDS:
        assert getattr(EdgeSettings(models="", **{field: tokens[field]}), field) is not None


def test_load_settings_says_the_refusal_in_one_line_without_the_token() -> None:
    """The start-up path (`load_settings`) turns the refusal into one ValueError line
    `"planner settings: <reason>"` naming both variables, as `dapdee serve` prints it."""
    with pytest.raises(ValueError) as refused:
        load_settings(PlannerSettings, "planner settings", redis_url=None, admin_token=SHARED, device_token=SHARED)
    message = str(refused.value)
    assert not isinstance(refused.value, ValidationError) and "\n" not in message, message
    assert message.startswith("planner settings: DAPDEE_ADMIN_TOKEN and DAPDEE_DEVICE_TOKEN hold the same token")
    assert SHARED not in message, message


@pytest.mark.parametrize("service", [["planner"], ["edge", "--models", "zoo:resnet18?width=0.125"]])
def test_serve_with_one_token_for_two_roles_exits_2_in_one_line(service: list[str]) -> None:
    """`dapdee serve …` with DAPDEE_DEVICE_TOKEN equal to DAPDEE_ADMIN_TOKEN in the environment:
    exit 2 before binding, one `dapdee: error:` line naming both variables, the token nowhere in
    the output. (The host is an address of no machine, TEST-NET-1, so a service that took the
    settings stops at the bind, with another message, instead of serving.)"""
    command = ["serve", *service, "--host", "192.0.2.1", "--port", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    env |= {"DAPDEE_DEVICE_TOKEN": SHARED, "DAPDEE_ADMIN_TOKEN": SHARED, "DAPDEE_REDIS_URL": "none"}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("dapdee")), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("dapdee: error: ") and "same token" in lines[0], lines[0]
    assert "DAPDEE_ADMIN_TOKEN" in lines[0] and "DAPDEE_DEVICE_TOKEN" in lines[0], lines[0]
    assert SHARED not in run.stderr + run.stdout, run.stderr
