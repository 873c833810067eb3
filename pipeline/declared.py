"""What ``dvc.yaml`` declares that a stage instance reads, and the check that it reads nothing else.

Two small files per instance, written by cheap stages before it runs:

* ``config/<scale>/settings/<kind>/<name>.yaml`` (stage ``configure``): its settings, resolved
  from params.yaml (``jem.config.instances``). The instance declares the file as its params,
  so DVC reruns it exactly when one of its own values changes.
* ``config/<scale>/inputs/<group>/<kind>/<name>.json`` (stages ``inputs_data``, ``inputs_fid``):
  the SHA-256 of every data file it reads. A variant's dataset role is known only once its params are resolved, which
  ``dvc.yaml`` cannot do, so this file stands for the variant's own splits, GMM statistics, OOD
  sets and reference statistics as a dependency: it changes exactly when one of them does.

Given the files (``--config``, ``--inputs``), a stage checks at start that its settings are the
file's and that every data file it opens is listed with the same content, so a stale or
incomplete declaration stops the stage in one line instead of leaving results DVC calls up to
date. Without them (a stage run by hand) it runs unchecked.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from jem.config.instances import plain
from jem.runtime.files import read_json
from pipeline.common import StageError


def settings_path(scale: str, kind: str, name: str = "") -> Path:
    return Path("config") / scale / "settings" / kind / f"{name or kind}.yaml"


# which stage fingerprints the inputs of each kind: inputs_data runs once the data and GMM
# statistics exist, inputs_fid once the reference statistics do (so training need not wait for them)
INPUT_GROUPS = {"fid": "fid"}


def inputs_path(scale: str, kind: str, name: str = "") -> Path:
    group = INPUT_GROUPS.get(kind, "data")
    return Path("config") / scale / "inputs" / group / kind / f"{name or kind}.json"


def write_settings(path: Path, kind: str, name: str, settings: dict[str, Any]) -> None:
    instance = f"{kind}@{name}" if name else kind
    header = (f"# What stage {instance} reads, resolved from params.yaml by stage configure.\n"
              "# Edit params.yaml, not this file: dvc repro rewrites it.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(plain(settings), sort_keys=True))


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                return _first_difference(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{where}.{key}".lstrip("."))
    return f"{where or '(top)'}: file {a!r}, params.yaml {b!r}"


def check_settings(path: Path | None, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (what the stage computed from params.yaml), after checking they are the ones
    ``dvc.yaml`` declared (``path``; None: no check)."""
    settings = plain(settings)
    if path is None:
        return settings
    if not path.exists():
        raise StageError(f"{path} not found; run dvc repro (stage configure writes it before this stage)")
    declared = yaml.safe_load(path.read_text())
    if declared != settings:
        raise StageError(f"{path} is stale ({_first_difference(declared, settings)}); run dvc repro, whose "
                         "configure stage rewrites it before this stage")
    return settings


def fingerprint(path: Path) -> str:
    """SHA-256 of a file's content; read once per process while its size and mtime stay (the paper
    scale's CIFAR-100 GMM statistics are ~4 GB, listed by every CIFAR-100 variant's train and sample)."""
    stat = path.stat()
    return _sha256(path.as_posix(), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_inputs(path: Path, files: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    listed = {p.as_posix(): fingerprint(p) for p in sorted(set(files))}
    path.write_text(json.dumps({"files": listed}, indent=1, sort_keys=True) + "\n")


class Inputs:
    """The data files a stage instance may read (``--inputs``), checked against their content."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.files: dict[str, str] = {}
        if path is None:
            return
        if not path.exists():
            raise StageError(f"{path} not found; run dvc repro (stages inputs_data and inputs_fid write it "
                             "before this stage)")
        self.files = read_json(path, "dvc repro")["files"]
        for name, digest in self.files.items():
            if not Path(name).exists():
                raise StageError(f"{name} (listed in {path}) is missing; run dvc repro")
            if fingerprint(Path(name)) != digest:
                raise StageError(f"{name} changed since {path} was written; run dvc repro (stage "
                                 "inputs_data or inputs_fid fingerprints it again and reruns what reads it)")

    def need(self, path: Path) -> Path:
        """``path``, once known to be declared; raises if ``dvc.yaml`` would not rerun this stage
        when it changes."""
        if self.path is not None and Path(path).as_posix() not in self.files:
            raise StageError(f"this stage reads {Path(path).as_posix()}, which {self.path} does not list, so DVC "
                             "would not rerun it when that file changes (stages/inputs.py decides the list)")
        return path
