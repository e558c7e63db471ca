"""Create the deployment's secrets file (`make secrets`): random role tokens and passwords.

    python3 deploy/gen_secrets.py FILE

FILE is an env file (`NAME=value` lines): docker compose interpolates it (`--env-file`, or `.env`
in the project directory) and `kubectl create secret generic dapdee-tokens --from-env-file=FILE`
turns it into the Kubernetes Secret. A missing FILE is created with mode 0600. An existing FILE is
never rewritten: values it has are kept and only the names it lacks are appended. Standard library
only (it runs before any virtual environment exists).
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path

# Every name the compose file and the Kubernetes manifests take from the file.
NAMES = (
    "DAPDEE_ADMIN_TOKEN",  # admin role: models, profiles, deletes, rebalance; workers register with it
    "DAPDEE_DEVICE_TOKEN",  # device role: POST /plan, infer
    "DAPDEE_WORKER_TOKEN",  # worker role: heartbeats
    "DAPDEE_REDIS_PASSWORD",  # Redis `requirepass`; the planner's DAPDEE_REDIS_URL carries it
    "DAPDEE_GRAFANA_PASSWORD",  # Grafana's `admin` user (compose only)
)
URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")
HEADER = (
    "# DAPDEE deployment secrets, written by `make secrets` (deploy/gen_secrets.py).\n"
    "# Private: gitignored, never commit it. Values must stay URL-safe ([A-Za-z0-9_-]).\n"
)


def random_value() -> str:
    """A fresh URL-safe secret: 32 random bytes, 43 characters. O(1)."""
    return secrets.token_urlsafe(32)


def read_names(text: str) -> dict[str, str]:
    """`NAME=value` pairs of an env file (comments and blank lines skipped). ValueError for a line
    that `kubectl create secret --from-env-file` refuses though compose takes it: an `export `
    prefix, or a name set twice. O(len(text))."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        if name.startswith("export "):
            raise ValueError(f"line {number}: {name!r}: drop the `export ` (kubectl takes no such key)")
        if name in out:
            raise ValueError(f"line {number}: {name} is set twice (kubectl refuses a repeated key)")
        out[name] = value.strip()
    return out


def create(path: Path) -> str:
    """Write a new secrets file (fails if it appeared meanwhile: O_EXCL); the message to print."""
    body = HEADER + "".join(f"{name}={random_value()}\n" for name in NAMES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    return f"wrote {path} ({', '.join(NAMES)})"


def complete(path: Path) -> str:
    """Append the names an existing secrets file lacks, keeping every value it has; the message to
    print. Raises ValueError when it sets one of NAMES to an empty or not URL-safe value, or has
    a line kubectl refuses (`read_names`)."""
    text = path.read_text()
    have = read_names(text)
    empty = [n for n in NAMES if n in have and not have[n]]
    if empty:
        raise ValueError(f"{path} sets {', '.join(empty)} empty: delete those lines and run `make secrets` again")
    # compose interpolates `$` in env files, Redis reads its password from a config line and the
    # planner from a URL: keep every value to the characters token_urlsafe draws from
    unsafe = [n for n in NAMES if n in have and not URL_SAFE.fullmatch(have[n])]
    if unsafe:
        raise ValueError(f"{path}: {', '.join(unsafe)} must be URL-safe ([A-Za-z0-9_-]); delete or fix those lines")
    missing = [n for n in NAMES if n not in have]
    if not missing:
        return f"kept {path} (it already sets {', '.join(NAMES)})"
    with open(path, "a") as f:
        f.write(("" if not text or text.endswith("\n") else "\n") + "".join(f"{n}={random_value()}\n" for n in missing))
    return f"kept the values in {path}; added {', '.join(missing)}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0]:
        print("usage: gen_secrets.py FILE", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        msg = complete(path) if path.exists() else create(path)
    except (OSError, ValueError) as exc:
        print(f"gen_secrets: {exc}", file=sys.stderr)
        return 1
    print(msg)
    mode = path.stat().st_mode & 0o077
    if mode:
        print(f"warning: {path} is readable by other users (chmod 600 {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
