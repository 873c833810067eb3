"""Dataset loading from fake archives in the real on-disk formats, OOD interpolation, splits, split files.

torchvision checks the md5 sums of the real archives, which the small fakes cannot match, so
the ``no_md5`` fixture replaces ``check_integrity`` in the torchvision dataset modules by one
that still requires the file to exist but ignores the checksum. Without it the fakes are
rejected, which shows that the loader itself keeps torchvision's checks.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.celeba as tv_celeba
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.svhn as tv_svhn
from PIL import Image

from jem.data.datasets import (
    TORCHVISION_DATASETS,
    DatasetUnavailable,
    interpolate_pairs,
    load_split,
    load_torchvision,
    save_split,
    train_val_split,
)


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    def exists_only(fpath: str | os.PathLike[str], md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    for module in (tv_cifar, tv_svhn, tv_celeba):
        monkeypatch.setattr(module, "check_integrity", exists_only)


# ---------------------------------------------------------------------------------------------
# Fake archives. CIFAR pickles were written by Python 2 and torchvision reads them with
# encoding="latin1", which yields str keys ("data", "labels"), so the fakes use str keys.


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def make_cifar10(root: Path, per_batch: int = 3, n_test: int = 4, seed: int = 0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows: dict[str, list] = {"train": [[], []], "test": [[], []]}
    for name, n, split in [*[(f"data_batch_{b}", per_batch, "train") for b in range(1, 6)],
                           ("test_batch", n_test, "test")]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        _pickle(folder / name, {"batch_label": name, "labels": labels, "data": data,
                                "filenames": [f"{name}_{i}.png" for i in range(n)]})
        rows[split][0].append(data)
        rows[split][1].extend(labels)
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072,
                                      "num_cases_per_batch": per_batch})
    return {s: (np.concatenate(d), np.array(lab)) for s, (d, lab) in rows.items()}


def make_cifar100(root: Path, seed: int = 1) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", 6), ("test", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        _pickle(folder / split, {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                                 "fine_labels": fine, "coarse_labels": coarse, "data": data})
        out[split] = (data, np.array(fine))
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"c{i}" for i in range(20)]})
    return out


def make_svhn(root: Path, seed: int = 2) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", 5), ("test", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in the .mat files
        y = np.array([10, 1, 5, 10, 9][:n], dtype=np.uint8).reshape(n, 1)  # 10 means digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


CELEBA_PARTITION = [0, 0, 0, 1, 2, 2]  # 0 train, 1 valid, 2 test
CELEBA_COLOURS = [(200, 30, 90), (10, 240, 120), (128, 128, 128), (0, 0, 255), (250, 250, 5), (60, 90, 30)]


def make_celeba(root: Path) -> None:
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{k + 1:06d}.jpg" for k in range(len(CELEBA_PARTITION))]
    for name, colour in zip(names, CELEBA_COLOURS, strict=True):
        # 178 wide, 218 high; black 20-row bands top and bottom, which the centre crop removes.
        pixels = np.zeros((218, 178, 3), dtype=np.uint8)
        pixels[20:198] = colour
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name, quality=95, subsampling=0)
    n = len(names)
    attrs = [f"Attr_{i}" for i in range(40)]
    lines = {
        "list_eval_partition.txt": [f"{f} {p}" for f, p in zip(names, CELEBA_PARTITION, strict=True)],
        "identity_CelebA.txt": [f"{f} {100 + k}" for k, f in enumerate(names)],
        "list_attr_celeba.txt": [str(n), " ".join(attrs)]
        + [f"{f} " + " ".join("1" if (k + i) % 3 == 0 else "-1" for i in range(40)) for k, f in enumerate(names)],
        "list_bbox_celeba.txt": [str(n), "image_id x_1 y_1 width height"]
        + [f"{f} 95 71 226 313" for f in names],
        "list_landmarks_align_celeba.txt": [
            str(n), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
            "rightmouth_x rightmouth_y"] + [f"{f} 69 109 106 113 77 142 73 152 108 154" for f in names],
    }
    for fname, content in lines.items():
        (folder / fname).write_text("\n".join(content) + "\n")


# ---------------------------------------------------------------------------------------------
# load_torchvision


def test_cifar10_pixels_and_labels_match_the_pickled_rows(tmp_path, no_md5, monkeypatch):
    expected = make_cifar10(tmp_path)
    # The loader converts the dataset's array in one go, never image by image.
    monkeypatch.setattr(tv_cifar.CIFAR10, "__getitem__", lambda self, i: pytest.fail("iterated PIL images"))
    for split in ("train", "test"):
        images, labels = load_torchvision("cifar10", tmp_path, split)
        rows, want_labels = expected[split]
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert images.shape == (len(rows), 3, 32, 32)
        assert images.flags.c_contiguous
        for k, row in enumerate(rows):
            np.testing.assert_array_equal(images[k], row.reshape(3, 32, 32))
        np.testing.assert_array_equal(labels, want_labels)
    assert len(load_torchvision("cifar10", tmp_path, "train")[0]) == 15  # all five batches, in order


def test_cifar100_uses_fine_labels(tmp_path, no_md5):
    expected = make_cifar100(tmp_path)
    for split in ("train", "test"):
        images, labels = load_torchvision("cifar100", str(tmp_path), split)
        rows, fine = expected[split]
        np.testing.assert_array_equal(images, rows.reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(labels, fine)
        assert labels.dtype == np.int64


def test_svhn_layout_and_label_10_becomes_0(tmp_path, no_md5):
    expected = make_svhn(tmp_path)
    for split in ("train", "test"):
        images, labels = load_torchvision("svhn", tmp_path, split)
        x, y = expected[split]
        assert images.shape == (x.shape[3], 3, 32, 32) and images.dtype == np.uint8
        for k in range(x.shape[3]):
            np.testing.assert_array_equal(images[k], x[:, :, :, k].transpose(2, 0, 1))
        want = y.reshape(-1).astype(np.int64)
        want[want == 10] = 0
        np.testing.assert_array_equal(labels, want)
        assert labels.dtype == np.int64 and 10 not in labels


def test_celeba_is_cropped_resized_and_unlabelled(tmp_path, no_md5):
    make_celeba(tmp_path)
    for split, ids in (("train", [0, 1, 2]), ("test", [4, 5])):
        images, labels = load_torchvision("celeba", tmp_path, split)
        assert images.shape == (len(ids), 3, 32, 32) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, np.zeros(len(ids)))
        for k, i in enumerate(ids):
            # Solid after cropping away the black bands (edge rows included), within JPEG error.
            want = np.array(CELEBA_COLOURS[i], dtype=np.int16)[:, None, None]
            assert np.abs(images[k].astype(np.int16) - want).max() <= 6


def test_celeba_other_image_size(tmp_path, no_md5):
    make_celeba(tmp_path)
    images, _ = load_torchvision("celeba", tmp_path, "test", image_size=64)
    assert images.shape == (2, 3, 64, 64)


def test_resize_only_when_sizes_differ(tmp_path, no_md5):
    make_cifar10(tmp_path)
    native, _ = load_torchvision("cifar10", tmp_path, "test")
    small, labels = load_torchvision("cifar10", tmp_path, "test", image_size=16)
    assert small.shape == (4, 3, 16, 16) and small.dtype == np.uint8 and len(labels) == 4
    # Antialiased 2x downscale keeps the mean roughly (random pixels, so no exact reference).
    assert abs(float(small.mean()) - float(native.mean())) < 3


def test_constant_image_survives_resize(tmp_path, no_md5):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(tmp_path)
    with open(folder / "test_batch", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")
    batch["data"][:] = 77
    _pickle(folder / "test_batch", batch)
    images, _ = load_torchvision("cifar10", tmp_path, "test", image_size=24)
    assert (images == 77).all()


EXPECTED_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "test_32x32.mat",
                   "celeba": "celeba"}
EXPECTED_URL = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
                "svhn": "http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "celeba": "CelebA"}


@pytest.mark.parametrize("name", TORCHVISION_DATASETS)
def test_missing_dataset_raises_one_line(tmp_path, name):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DatasetUnavailable) as info:
        load_torchvision(name, root, "test")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(root) in msg
    assert os.path.join(str(root), EXPECTED_FOLDER[name]) in msg
    assert EXPECTED_URL[name] in msg
    assert "data.root" in msg and "params.yaml" in msg and "data.download: true" in msg


def test_relative_root_is_reported_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetUnavailable, match=str(tmp_path / "rel" / "cifar-100-python")):
        load_torchvision("cifar100", "rel", "train")


@pytest.mark.parametrize("name", ["cifar10", "svhn", "celeba"])
def test_fakes_fail_the_real_integrity_checks(tmp_path, name):
    {"cifar10": make_cifar10, "svhn": make_svhn, "celeba": make_celeba}[name](tmp_path)
    with pytest.raises(DatasetUnavailable, match="missing or corrupted"):
        load_torchvision(name, tmp_path, "train")


def test_failed_download_raises_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_svhn, "download_url", offline)
    for name in ("cifar10", "svhn"):
        with pytest.raises(DatasetUnavailable) as info:
            load_torchvision(name, tmp_path, "test", download=True)
        msg = str(info.value)
        assert "\n" not in msg and "download failed" in msg and "URLError" in msg
        assert str(tmp_path) in msg
        assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_download_skipped_when_files_present(tmp_path, no_md5, monkeypatch):
    expected = make_cifar10(tmp_path)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    images, _ = load_torchvision("cifar10", tmp_path, "test", download=True)
    np.testing.assert_array_equal(images, expected["test"][0].reshape(-1, 3, 32, 32))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_torchvision("mnist", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_torchvision("cifar10", tmp_path, "valid")


# ---------------------------------------------------------------------------------------------
# interpolate_pairs


def _tagged_images(count: int, seed: int = 0) -> np.ndarray:
    """Row 0 of image k is one-hot (254 at column k), so an average names its pair; row 1 is random."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 1, 2, count), dtype=np.uint8)
    images[np.arange(count), 0, 0, np.arange(count)] = 254
    images[:, 0, 1] = rng.integers(0, 256, (count, count), dtype=np.uint8)
    return images


def test_interpolate_pairs_averages_distinct_images_with_rounding():
    images = _tagged_images(12)
    out = interpolate_pairs(images, n=500, seed=3)
    assert out.shape == (500, 1, 2, 12) and out.dtype == np.uint8
    seen = set()
    odd_sums = 0
    for avg in out:
        tag = avg[0, 0]
        pair = np.flatnonzero(tag)
        assert len(pair) == 2, "an image was paired with itself"
        assert (tag[pair] == 127).all()
        i, j = pair
        a, b = images[i, 0, 1].astype(int), images[j, 0, 1].astype(int)
        want = [round((x + y) / 2) for x, y in zip(a, b, strict=True)]  # Python rounds half to even
        np.testing.assert_array_equal(avg[0, 1], want)
        odd_sums += int(((a + b) % 2).sum())
        seen.add((int(i), int(j)))
    assert odd_sums > 0  # the rounding was exercised
    assert len(seen) == 12 * 11 // 2  # every unordered pair turns up


def test_interpolate_pairs_defaults_and_determinism():
    images = _tagged_images(7)
    assert interpolate_pairs(images).shape == images.shape
    np.testing.assert_array_equal(interpolate_pairs(images, seed=5), interpolate_pairs(images, seed=5))
    assert not np.array_equal(interpolate_pairs(images, 50, seed=5), interpolate_pairs(images, 50, seed=6))
    assert interpolate_pairs(images, n=0).shape == (0, 1, 2, 7)
    two = np.stack([np.full((3, 2, 2), 0, np.uint8), np.full((3, 2, 2), 255, np.uint8)])
    assert (interpolate_pairs(two, n=20) == 128).all()  # 127.5 -> 128 (even)


def test_interpolate_pairs_rejects_bad_input():
    with pytest.raises(ValueError):
        interpolate_pairs(np.zeros((1, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError):
        interpolate_pairs(np.zeros((4, 3, 4, 4), np.float32))
    with pytest.raises(ValueError):
        interpolate_pairs(np.zeros((4, 3, 4, 4), np.uint8), n=-1)


# ---------------------------------------------------------------------------------------------
# train_val_split


def _check_partition(train_idx: np.ndarray, val_idx: np.ndarray, total: int) -> None:
    assert train_idx.dtype == np.int64 and val_idx.dtype == np.int64
    assert (np.diff(train_idx) > 0).all() and (np.diff(val_idx) > 0).all()
    assert not set(train_idx) & set(val_idx)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(total))


@pytest.mark.parametrize("val_size", [1, 4, 10, 37, 99])
def test_train_val_split_is_stratified_exact_and_a_partition(val_size):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([3, 7, 11, 20], [50, 30, 13, 7]))  # imbalanced, non-contiguous ids
    train_idx, val_idx = train_val_split(labels, val_size, seed=1)
    _check_partition(train_idx, val_idx, len(labels))
    assert len(val_idx) == val_size
    for c in (3, 7, 11, 20):
        share = val_size * np.mean(labels == c)
        assert abs(np.sum(labels[val_idx] == c) - share) < 1


def test_train_val_split_proportional_counts():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    _, val_idx = train_val_split(labels, 10)
    assert np.bincount(labels[val_idx]).tolist() == [5, 3, 2]


def test_train_val_split_deterministic_in_seed():
    labels = np.arange(200) % 5
    a = train_val_split(labels, 25, seed=4)
    b = train_val_split(labels, 25, seed=4)
    c = train_val_split(labels, 25, seed=5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_train_val_split_zero_and_bad_sizes():
    labels = np.arange(10) % 2
    train_idx, val_idx = train_val_split(labels, 0)
    _check_partition(train_idx, val_idx, 10)
    assert len(val_idx) == 0 and len(train_idx) == 10
    for bad in (10, 11, -1):
        with pytest.raises(ValueError) as info:
            train_val_split(labels, bad)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# save_split / load_split


def _split_arrays(n: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def test_save_load_round_trip_atomic(tmp_path):
    images, labels = _split_arrays()
    path = tmp_path / "nested" / "dir" / "train.npz"
    save_split(path, images, labels)
    assert os.listdir(path.parent) == ["train.npz"]  # no temp file left behind
    got_images, got_labels = load_split(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int64
    with np.load(path) as archive:  # plain, uncompressed npz with the two arrays
        assert sorted(archive.files) == ["images", "labels"]
        assert archive.zip.infolist()[0].compress_type == 0
    # Overwrite in place.
    save_split(path, images[:3], labels[:3])
    assert len(load_split(path)[0]) == 3
    assert os.listdir(path.parent) == ["train.npz"]


def test_save_split_writes_exactly_the_given_name(tmp_path):
    images, labels = _split_arrays()
    path = tmp_path / "split.data"
    save_split(str(path), images, labels)
    assert os.listdir(tmp_path) == ["split.data"]
    np.testing.assert_array_equal(load_split(path)[0], images)


def test_save_split_failure_leaves_nothing(tmp_path, monkeypatch):
    images, labels = _split_arrays()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        save_split(tmp_path / "train.npz", images, labels)
    assert os.listdir(tmp_path) == []


def test_save_split_rejects_wrong_dtypes_and_shapes(tmp_path):
    images, labels = _split_arrays()
    bad = [
        (images.astype(np.float32), labels),
        (images, labels.astype(np.int32)),
        (images[0], labels),
        (images, labels[:, None]),
        (images, labels[:-1]),
    ]
    for im, lab in bad:
        with pytest.raises(ValueError) as info:
            save_split(tmp_path / "x.npz", im, lab)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x.npz").exists()


def test_load_split_rejects_wrong_dtypes(tmp_path):
    images, labels = _split_arrays()
    path = tmp_path / "bad.npz"
    np.savez(path, images=images.astype(np.float32), labels=labels)
    with pytest.raises(ValueError, match="uint8"):
        load_split(path)
    np.savez(path, images=images, labels=labels.astype(np.int32))
    with pytest.raises(ValueError, match="int64"):
        load_split(path)
    np.savez(path, images=images)
    with pytest.raises(ValueError, match="labels"):
        load_split(path)


def test_load_split_missing_file(tmp_path):
    path = tmp_path / "prepared" / "cifar10_train.npz"
    with pytest.raises(FileNotFoundError) as info:
        load_split(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "dvc repro prepare" in msg


def test_celeba_uncropped_keeps_the_aspect_ratio_like_resize_32(tmp_path, no_md5):
    make_celeba(tmp_path)
    images, _ = load_torchvision("celeba", tmp_path, "test", crop="none")
    # 178 x 218 with the shorter side at 32: 32 wide, int(32 * 218 / 178) = 39 high (torchvision Resize(32))
    assert images.shape == (2, 3, 39, 32) and images.dtype == np.uint8
    for k, i in enumerate((4, 5)):
        # the black bands stay: the top row is dark, the middle row the image's colour
        assert images[k, :, 0].astype(int).mean() < 60
        want = np.array(CELEBA_COLOURS[i], dtype=np.int16)[:, None]
        assert np.abs(images[k, :, 19].astype(np.int16) - want).max() <= 6
    with pytest.raises(ValueError, match="unknown crop 'top'"):
        load_torchvision("celeba", tmp_path, "test", crop="top")
