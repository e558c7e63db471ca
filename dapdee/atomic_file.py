"""Replacing a file's content all at once, so a reader (or a crash) never sees half of it."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file of a unique name in the same folder,
    flushed to disk and renamed over it: readers see the old content or the new, never part of
    it, and writers at once each replace the file whole (a shared temporary name let one rename
    the other's half-written file, or find it gone). A failed write leaves what was there and no
    temporary file, and raises OSError. The file gets the mode a plain open() would give it:
    the replaced file's, else 0o666 less the umask. O(len(text))."""
    path = os.fspath(path)
    tmp = None
    try:
        tmp, fd = _create_beside(os.path.dirname(os.path.abspath(path)))
        with open(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            old = os.stat(path)
            if stat.S_ISREG(old.st_mode):
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _create_beside(folder: str) -> tuple[str, int]:
    """(path, descriptor open for writing) of a new empty file of a unique name in `folder`,
    created with mode 0o666 less the umask, as open() creates a file (tempfile's are 0o600).
    Raises OSError. O(1) expected."""
    while True:
        tmp = os.path.join(folder, f".dapdee-{secrets.token_hex(8)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue  # 64 random bits taken: try another name
