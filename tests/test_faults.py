"""Faults in the middle of a run (README "What survives what"). The disk fills while a checkpoint, a
file or an output folder is written: the previous file, folder or checkpoint survives intact, the
error is one line naming the path and the space it needs, and a rerun after space is freed resumes.
A metrics file is written only in part: its reader stops in one line naming it. Two `dvc repro` meet
in one workspace: the second stops (the table runner waits), and nothing is corrupted.

The disk is a real 256 KiB tmpfs where this process may mount one (root); the checkpoint case, and
every case where mounting is not allowed, gets the ``ENOSPC`` from an injected ``fsync`` (where
delayed-allocation filesystems report it)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jem.runtime.checkpoint import load_verified
from jem.runtime.files import DiskFull, atomic_write
from pipeline.common import main_guard
from pipeline.outputs import building, read_metrics, write_json, write_metrics

from .test_session import new_session


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (skipped where this process may not mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC tests cover the same writers")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """``fsync`` of any file whose path contains ``name`` fails with ENOSPC (the list records them)."""
    real = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if name in path:
            failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def _one_line_naming(exc: DiskFull, path: Path, needs: str, kept: str) -> None:
    message = str(exc)
    assert "\n" not in message and message.startswith(f"{path}: no space left on the device ({needs}"), message
    assert f"; {kept}; free some space there and rerun" in message, message


def test_a_file_written_on_a_full_disk_leaves_the_previous_one_and_says_what_it_needs(small_disk: Path):
    target = small_disk / "stats.json"
    write_json(target, {"fid": 12.5})
    before = target.read_bytes()
    with pytest.raises(DiskFull) as full:
        atomic_write(target, b"x" * 400_000)
    _one_line_naming(full.value, target, "it needs 390.6 KiB", "the previous stats.json is kept")
    assert target.read_bytes() == before and sorted(p.name for p in small_disk.iterdir()) == ["stats.json"]
    atomic_write(target, b"x" * 100_000)  # room for it once the space is there
    assert target.stat().st_size == 100_000


def test_an_output_folder_written_on_a_full_disk_keeps_the_previous_folder(small_disk: Path):
    out = small_disk / "samples"
    with building(out) as tmp:
        (tmp / "grid.png").write_bytes(b"old" * 1000)
    with pytest.raises(DiskFull) as full, building(out) as tmp:
        (tmp / "info.json").write_text("{}")
        (tmp / "samples.npz").write_bytes(b"x" * 400_000)  # a writer of its own (numpy, PIL, torch)
    _one_line_naming(full.value, out, "it needs more than", "the previous samples/ is kept")
    assert [p.name for p in out.iterdir()] == ["grid.png"] and (out / "grid.png").read_bytes() == b"old" * 1000
    assert sorted(p.name for p in small_disk.iterdir()) == ["samples"]  # no partial folder beside it


def test_the_injected_fault_reaches_the_same_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """Where no tmpfs can be mounted, the writers meet ENOSPC at fsync; the stage prints the one line, exit 2."""
    target = tmp_path / "metrics.json"
    write_json(target, {"acc": 0.5})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes, not 0600
    fill_disk_at(monkeypatch, "metrics.json")
    with pytest.raises(SystemExit) as stopped:
        main_guard(lambda: write_json(target, {"acc": 0.9}))
    assert stopped.value.code == 2 and target.read_text().strip() == '{\n  "acc": 0.5\n}'
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {target}: no space left on the device (it needs 17 bytes, ")
    assert list(tmp_path.iterdir()) == [target]


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one_and_a_rerun_resumes_from_it(tmp_path, tiny_data,
                                                                                      monkeypatch):
    failed = fill_disk_at(monkeypatch, "step-000000010.pt")
    session, _ = new_session(tmp_path, tiny_data, train={"epochs": 2})
    with pytest.raises(DiskFull) as full:
        session.run()
    assert len(failed) == 1
    _one_line_naming(full.value, tmp_path / "step-000000010.pt", "it needs ",
                     "the last checkpoint step-000000008.pt is kept")
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["step-000000006.pt", "step-000000008.pt"]  # no temporary file left beside them
    assert load_verified(tmp_path / "step-000000008.pt")["step"] == 8

    monkeypatch.undo()  # space freed
    again, lines = new_session(tmp_path, tiny_data, train={"epochs": 2})
    assert lines == [f"resumed from {tmp_path / 'step-000000008.pt'} at step 8 (epoch 1)"]
    assert again.run().trainer.step == 12


def test_a_metrics_file_written_only_in_part_stops_its_reader_with_one_line_naming_it(tmp_path: Path, capsys):
    path = tmp_path / "metrics" / "eval" / "jem_k20" / "seed1.json"
    write_metrics(path, {"acc": 0.91, "ece": 0.04, "status": "ok"})
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # copied, synced or killed mid-write by something else
    with pytest.raises(SystemExit) as stopped:
        main_guard(lambda: read_metrics(path))
    [line] = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and line.startswith(f"error: {path}: not valid JSON (")
    assert line.endswith("written only in part?); nothing was read from it: rerun the stage that writes it "
                         "to write it again"), line
    assert path.read_bytes() == whole[: len(whole) // 2]  # left as it was, for the user to look at


@pytest.mark.e2e(cost=12)
def test_a_second_dvc_repro_in_the_same_workspace_stops_in_one_line_and_the_table_runner_waits(
        tiny_workspace, monkeypatch):
    """Two users (or a user and `python -m stages.table`) in one workspace: DVC's repository lock, held
    here as a running `dvc repro` holds it. A second `dvc repro` stops at once with DVC's line; the table
    runner's DVC calls wait for the lock and then go on; dvc.lock, the DVC cache and mlflow.db are untouched."""
    import threading

    from dvc.repo import Repo

    from pipeline import table

    work, env = tiny_workspace
    monkeypatch.chdir(work)
    kept = ("dvc.lock", "mlflow.db")
    before = {name: (work / name).read_bytes() for name in kept}
    cache = sorted(p.relative_to(work) for p in (work / ".dvc" / "cache").rglob("*"))
    said: list[str] = []
    codes: list[int] = []
    with Repo(str(work)).lock:  # what a `dvc repro` running in this workspace holds
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0 and "ERROR: Unable to acquire lock" in proc.stderr, proc.stderr
        waiting = threading.Thread(target=lambda: codes.append(table.dvc(
            ["repro", "--single-item", "inputs_data"], env, work / "logs" / "locked.log", said.append)))
        waiting.start()
        deadline = time.time() + 60
        while not said and time.time() < deadline:
            time.sleep(0.1)
        assert said == ["[table] dvc repro --single-item inputs_data: another process holds a DVC lock; waiting"]
        assert not codes  # still waiting while the other holds the lock
    waiting.join(60)
    assert codes == [0]  # went on once the lock was released
    assert {name: (work / name).read_bytes() for name in kept} == before
    assert sorted(p.relative_to(work) for p in (work / ".dvc" / "cache").rglob("*")) == cache
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
