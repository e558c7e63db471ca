"""Model and tier names (the one validation rule) and the bound on a model's input size,
importable without torch.

Names travel in URLs and Redis keys and name cache files, so they are restricted to
1-64 characters of letters, digits, '_', '.', '-' (not starting with a punctuation mark).
"""

from __future__ import annotations

import re

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # use with fullmatch
# the same rule as a JSON Schema / OpenAPI pattern (anchored; no '..' anywhere)
MODEL_NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


MAX_INPUT_ELEMENTS = 1 << 28  # an example input of more (1 GiB of float32) is a typo, not a model


class ModelError(ValueError):
    """A model spec, artifact, name or input shape that cannot be used; the message says why."""


def check_model_name(name: str, what: str = "model name") -> str:
    """Return `name` if it is a valid model/tier name, else raise ModelError naming it as `what`
    (e.g. "--device-id"). The whole string must match (a trailing newline does not pass).
    O(len(name))."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or ".." in name:
        raise ModelError(f"{what} {name!r}: use 1-64 letters, digits, '_', '.', '-' (not starting with one)")
    return name
