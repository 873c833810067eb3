"""Checksummed checkpoint files and the rotating checkpoint folder."""

from __future__ import annotations

import os

import pytest
import torch

from jem.runtime.checkpoint import CheckpointDir, CorruptCheckpoint, load_verified, save_verified


def test_round_trip_and_every_kind_of_damage_is_detected(tmp_path):
    state = {"w": torch.arange(1000.0), "step": 7, "nested": {"a": [1, 2]}}
    path = tmp_path / "c.pt"
    save_verified(state, path)
    back = load_verified(path)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7 and back["nested"] == {"a": [1, 2]}
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "header only": data[:20],
        "empty": b"",
        "flipped byte": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],
        "plain torch file": None,
    }
    for name, blob in damaged.items():
        bad = tmp_path / f"{name}.pt"
        if blob is None:
            torch.save(state, bad)
        else:
            bad.write_bytes(blob)
        with pytest.raises(CorruptCheckpoint, match=r"checksum mismatch|not a jem checkpoint"):
            load_verified(bad)


def test_folder_keeps_the_newest_and_falls_back_past_damaged_files(tmp_path):
    folder = CheckpointDir(tmp_path / "ckpt", keep=3)
    for step in (10, 20, 30, 40):
        folder.save({"step": step}, step)
    assert [p.name for p in folder.paths()] == ["step-000000020.pt", "step-000000030.pt", "step-000000040.pt"]
    assert not [f for f in os.listdir(folder.folder) if f.endswith(".tmp")]
    newest = folder.paths()[-1]
    newest.write_bytes(newest.read_bytes()[:-10])  # a write cut short
    messages: list[str] = []
    state, path = folder.latest(messages.append)
    assert state["step"] == 30 and path.name == "step-000000030.pt"
    assert len(messages) == 1 and "step-000000040.pt: checksum mismatch" in messages[0]
    for p in folder.paths():
        p.write_bytes(b"junk")
    assert folder.latest(messages.append) is None


def test_set_aside_keeps_the_files_out_of_the_way(tmp_path):
    folder = CheckpointDir(tmp_path, keep=2)
    folder.save({"step": 1}, 1)
    messages: list[str] = []
    folder.set_aside("written for other params", messages.append)
    assert folder.paths() == [] and (tmp_path / "stale" / "step-000000001.pt").exists()
    assert "moved 1 checkpoint(s)" in messages[0]
