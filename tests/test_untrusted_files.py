"""What the pipeline reads back from a shared cache, remote or checkpoint folder is data, never code.

Each kind of file it writes (trained weights, checkpoints, samples, GMM statistics, Inception
statistics) is crafted here to carry a pickled call that creates a marker file, the way a writer
with access to the remote could. The loader must refuse it in one line naming the file, and the
marker must not exist afterwards. A control shows each crafted file does run its call when read
the unsafe way, so the refusals are not vacuous.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from jem.config.errors import InputError
from jem.evaluation.inception import GaussianStats
from jem.method.gmm import load_mixture_stats
from jem.method.models import build_model, load_model
from jem.runtime.checkpoint import CheckpointDir, UnsafeFile, load_arrays, load_tensors, save_verified

from .conftest import tiny_variant


class Marker:
    """Unpickling it calls ``open(path, "w")``: a file appears where none should."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _refused(load, path: Path, marker: Path) -> str:
    with pytest.raises(UnsafeFile) as info:
        load()
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert not marker.exists(), "the crafted call ran"
    return message


def test_the_crafted_payload_runs_when_read_the_unsafe_way(tmp_path):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"model": {}, "extra": Marker(marker)}, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)
    assert marker.exists()
    marker.unlink()
    archive = tmp_path / "a.npz"
    np.savez(archive, buffer=np.array([Marker(marker)], dtype=object))
    with np.load(archive, allow_pickle=True) as f:
        f["buffer"]
    assert marker.exists()


def test_trained_weights_carrying_a_pickled_call_are_refused(tmp_path):
    variant = tiny_variant()
    path = tmp_path / "models" / "tiny" / variant.name / "final.pt"
    path.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"variant": variant.to_dict(), "model": build_model(variant.model).state_dict(),
                "buffer": {"samples": torch.zeros(2, 3, 8, 8), "note": Marker(marker)}}, path)
    message = _refused(lambda: load_model(path), path, marker)
    assert "io.open" in message and "rerun its train stage" in message
    _refused(lambda: load_tensors(path, writer="its train stage"), path, marker)  # the sample stage's read


def test_a_checkpoint_with_a_valid_checksum_and_a_pickled_call_is_refused_not_skipped(tmp_path):
    """The checksum catches truncation, not a writer who rewrites both: resuming refuses the file and
    stops (a tampered checkpoint is not silently replaced by the one before it)."""
    folder = CheckpointDir(tmp_path / "checkpoints")
    folder.save({"step": 1, "model": {"w": torch.ones(2)}}, 1)
    marker = tmp_path / "ran"
    crafted = folder.save({"step": 2, "model": {"w": torch.ones(2)}, "rng": Marker(marker)}, 2)
    _refused(lambda: folder.latest(log=lambda line: None), crafted, marker)


def test_an_intact_checkpoint_round_trips_with_its_rng_states(tmp_path):
    from jem.runtime.checkpoint import capture_rng, load_verified

    state = {"model": {"w": torch.randn(3)}, "rng": capture_rng(), "step": 7, "name": "x", "lr": [0.1, 0.01]}
    save_verified(state, tmp_path / "c.pt")
    back = load_verified(tmp_path / "c.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["step"] == 7
    np.testing.assert_array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert back["rng"]["python"] == state["rng"]["python"]


def test_samples_with_an_object_array_are_refused(tmp_path):
    path = tmp_path / "samples" / "samples.npz"
    path.parent.mkdir()
    marker = tmp_path / "ran"
    np.savez(path, buffer=np.zeros((2, 8, 8, 3), np.uint8), fresh=np.array([Marker(marker)], dtype=object))
    message = _refused(lambda: load_arrays(path, writer="its sample stage"), path, marker)
    assert "'fresh'" in message


def test_gmm_statistics_carrying_a_pickled_call_are_refused(tmp_path):
    path = tmp_path / "gmm" / "stats.pt"
    path.parent.mkdir()
    marker = tmp_path / "ran"
    torch.save({"counts": torch.ones(2), "means": torch.zeros(2, 3), "covs": torch.zeros(2, 3, 3),
                "shape": Marker(marker)}, path)
    message = _refused(lambda: load_mixture_stats(path), path, marker)
    assert "gmm stage" in message


def test_inception_statistics_with_an_object_array_are_refused(tmp_path):
    path = tmp_path / "fid_ref" / "stats.npz"
    path.parent.mkdir()
    marker = tmp_path / "ran"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3), n=np.array([Marker(marker)], dtype=object))
    message = _refused(lambda: GaussianStats.load(path), path, marker)
    assert "fid_ref stage" in message


def test_refusal_is_an_input_error_the_stages_print_in_one_line(tmp_path):
    """main_guard prints an InputError as `error: <message>` and exits 2."""
    assert issubclass(UnsafeFile, InputError)
    marker = tmp_path / "ran"
    data = io.BytesIO()
    torch.save([Marker(marker)], data)
    data.seek(0)
    with pytest.raises(UnsafeFile, match=r"^x\.pt: refused without running anything: it holds a pickled io\.open"):
        load_tensors(data, "x.pt")
    assert not marker.exists()
