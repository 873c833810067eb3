"""Atomic, checksummed save/load and the random-number-generator state that exact resume needs."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from jem.config.errors import InputError
from jem.runtime.files import DiskFull, atomic_write


class CorruptCheckpoint(InputError):
    """A checkpoint file that fails its checksum (truncated, corrupted, or not a checkpoint)."""


class UnsafeFile(InputError):
    """A file that holds pickled objects other than tensors and plain data: refused, nothing in it run."""


# numpy's RNG state (in checkpoints) is an array: these rebuild arrays from bytes and run no code
_NUMPY_DATA = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def load_tensors(source: str | os.PathLike[str] | BinaryIO, path: str | os.PathLike[str] | None = None,
                 writer: str = "the stage that writes it") -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings, containers and numpy arrays only.

    Every file the pipeline or a remote wrote is read this way (weights, checkpoints, statistics), so
    a file crafted to carry a pickled call is refused before the call can run: ``UnsafeFile``, one
    line naming the file and the object it holds.
    """
    path = path if path is not None else source
    try:
        with torch.serialization.safe_globals(_NUMPY_DATA):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        held = f"a pickled {found.group(1)}" if found else "pickled objects"
        raise UnsafeFile(f"{path}: refused without running anything: it holds {held}, which no file of this "
                         f"pipeline contains; check who can write there, delete it and rerun {writer}") from None


def load_arrays(path: str | os.PathLike[str], writer: str = "the stage that writes it") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read without pickle: an object array (the only kind that
    can carry code) is refused with ``UnsafeFile`` naming the file and the array, unread."""
    with np.load(path, allow_pickle=False) as archive:
        out = {}
        for key in archive.files:
            try:
                out[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" not in str(exc):
                    raise
                raise UnsafeFile(f"{path}: refused without running anything: its array {key!r} holds pickled "
                                 f"objects, which no file of this pipeline contains; check who can write there, "
                                 f"delete it and rerun {writer}") from None
    return out


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through ``atomic_write`` (into memory first, so a full disk can say the size)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- checksummed checkpoints ------------------------------------------------------------------
# A checkpoint file is MAGIC + sha256(payload) + payload, the payload being torch.save's bytes,
# so a truncated or corrupted file is told apart from a good one before anything is loaded.
MAGIC = b"JEMCKPT\x01"
_HEADER = len(MAGIC) + 32


def save_verified(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` with a checksum header, written atomically (temp file + fsync + rename)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()

    def write(fh: BinaryIO) -> None:
        fh.write(MAGIC)
        fh.write(hashlib.sha256(payload).digest())
        fh.write(payload)

    atomic_write(path, write, size=_HEADER + len(payload))


def load_verified(path: str | os.PathLike[str]) -> Any:
    """The object ``save_verified`` wrote; ``CorruptCheckpoint`` if the file is not intact."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise CorruptCheckpoint(f"{path}: not a jem checkpoint or its header is cut ({len(data)} bytes)")
    payload = memoryview(data)[_HEADER:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):_HEADER]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch ({len(data)} bytes): truncated or corrupted")
    return load_tensors(io.BytesIO(payload), path, "the train stage")


class CheckpointDir:
    """The last ``keep`` checkpoints of a run, ``step-<step>.pt``, newest used first.

    ``latest()`` skips (and reports through ``log``) any file that fails its checksum and
    falls back to the one before it, so a crash mid-write or a damaged disk costs at most the
    steps since the previous checkpoint.
    """

    PATTERN = "step-*.pt"

    def __init__(self, folder: str | os.PathLike[str], keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(self.folder.glob(self.PATTERN), key=lambda p: int(p.stem.split("-")[1]))

    def save(self, state: Any, step: int) -> Path:
        path = self.folder / f"step-{step:09d}.pt"
        try:
            save_verified(state, path)
        except DiskFull as exc:  # the checkpoints before it are all still there
            kept = self.paths()
            raise DiskFull(path, exc.needed, f"the last checkpoint {kept[-1].name} is kept" if kept else
                           "no checkpoint was written yet", exact=exc.exact) from exc
        for old in self.paths()[:-self.keep]:
            old.unlink()
        return path

    def latest(self, log: Callable[[str], None] = print) -> tuple[Any, Path] | None:
        """The newest intact checkpoint and its path, or None when there is none."""
        for path in reversed(self.paths()):
            try:
                return load_verified(path), path
            except CorruptCheckpoint as exc:
                log(f"{exc}; falling back to the checkpoint before it")
        return None

    def set_aside(self, reason: str, log: Callable[[str], None] = print) -> None:
        """Move every checkpoint to ``stale/`` (replacing what was there): kept, never resumed from."""
        paths = self.paths()
        if not paths:
            return
        stale = self.folder / "stale"
        if stale.exists():
            for old in stale.glob(self.PATTERN):
                old.unlink()
        stale.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.replace(path, stale / path.name)
        log(f"{reason}; moved {len(paths)} checkpoint(s) to {stale} and starting over")
