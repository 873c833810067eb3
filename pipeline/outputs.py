"""The files a stage writes: JSON written atomically, metrics split into numbers (what DVC's
metrics read) and notes (everything else), and output folders built beside their final place
and swapped in only when complete, so nothing partial is ever left where DVC looks."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jem.runtime.files import DiskFull, atomic_write, is_disk_full, read_json


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def notes_path(metrics: Path) -> Path:
    """``metrics/demo/eval/v.json`` -> ``metrics/demo/eval/v.notes.json``: what is not a number."""
    return metrics.with_name(f"{metrics.stem}.notes.json")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _split(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    numbers: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            n, t = _split(value)
            if n:
                numbers[key] = n
            if t:
                notes[key] = t
        elif _is_number(value):
            numbers[key] = value
        else:
            notes[key] = value
    return numbers, notes


def write_metrics(path: Path, data: dict[str, Any]) -> None:
    """A stage's results, as DVC reads metrics: the numbers (nested keys kept) go to ``path`` and
    everything else (names, statuses, reasons, paths, missing values) to ``notes_path(path)``,
    so ``dvc metrics show`` / ``diff`` is a table of numbers. ``read_metrics`` joins them again."""
    numbers, notes = _split(data)
    write_json(notes_path(path), notes)
    write_json(path, numbers)


def _join(numbers: dict[str, Any], notes: dict[str, Any]) -> dict[str, Any]:
    out = dict(numbers)
    for key, value in notes.items():
        out[key] = _join(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_metrics(path: Path) -> dict[str, Any] | None:
    """What ``write_metrics`` wrote to ``path`` and its notes, as one dict (None when not written)."""
    if not path.exists():
        return None
    numbers = read_json(path)
    notes = notes_path(path)
    return _join(numbers, read_json(notes)) if notes.exists() else numbers



def swap_in(tmp: Path, out: Path) -> None:
    """Replace the folder ``out`` by the finished folder ``tmp``: the old one is renamed aside first
    and removed last, so ``out`` is at every moment the old folder or the new one, never a mix."""
    import shutil

    old = out.with_name(f".{out.name}.old")
    if old.exists():  # left by a crash between the two renames below
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; swapped in for ``out`` only on success.

    When the disk fills while it is written, the partial folder is removed, ``out`` keeps what it
    held, and the error (``DiskFull``) is one line naming ``out`` and what had been written."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        swap_in(tmp, out)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        kept = f"the previous {out.name}/ is kept" if out.exists() else "nothing was left there"
        raise DiskFull(out, written, kept) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
