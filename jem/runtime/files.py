"""Files written whole or not at all, and their digests (no torch: the stages that only write JSON use it).

Every file the pipeline writes (checkpoints, weights, prepared datasets, Inception statistics, metrics
JSON) goes through ``atomic_write``: a temporary file in the same folder, fsynced, then renamed over
the target, so a reader or a crash sees the old file or the new one, never half of one. A full disk
leaves the old file as it was and raises ``DiskFull``: one line naming the file and the space it needs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from jem.config.errors import InputError


class DiskFull(InputError):
    """No space left where ``path`` was being written: one line naming it, the space it ``needed``
    (exactly, or more than that: what was written when the space ran out), what is free there,
    and what was ``kept``."""

    def __init__(self, path: str | os.PathLike[str], needed: int | None, kept: str, exact: bool = False) -> None:
        self.path, self.needed, self.kept, self.exact = Path(path), needed, kept, exact
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        need = "it needs more space" if not needed else \
            f"it needs {_size(needed)}" if exact else f"it needs more than {_size(needed)}"
        super().__init__(f"{path}: no space left on the device ({need}, {_size(free)} free); {kept}; free some "
                         "space there and rerun (a training resumes from its last checkpoint)")


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | os.PathLike[str], data: bytes | memoryview | Callable[[BinaryIO], None],
                 size: int | None = None) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` atomically:
    into a temporary file beside it, fsynced, then renamed over ``path``.

    A reader (or a crash) never sees a partially written file at ``path``; on a full disk the
    temporary file is removed, ``path`` keeps its previous content, and ``DiskFull`` says how much
    the file needs (its ``size`` when given or ``data`` is bytes, else at least what was written when
    it failed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's mode, as open() gives (not 0600)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(exc):
            known = size or (len(data) if isinstance(data, (bytes, memoryview)) else None)
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was left there"
            raise DiskFull(path, known or written, kept, exact=known is not None) from exc
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's content, read in blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_json(path: str | os.PathLike[str], writer: str = "the stage that writes it") -> Any:
    """A JSON file the pipeline wrote; one that is cut short or damaged (copied mid-write, edited,
    a disk error) is ``InputError``: one line naming the file and where it breaks, read no further."""
    try:
        return json.loads(Path(path).read_text())
    except UnicodeDecodeError as exc:
        reason = f"not text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}; written only in part?)"
    raise InputError(f"{path}: {reason}; nothing was read from it: rerun {writer} to write it again")
