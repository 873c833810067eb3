"""Real image datasets as compact uint8 arrays, plus the splits the pipeline stores on disk.

``load_torchvision`` reads CIFAR-10, CIFAR-100, SVHN and CelebA from their standard
torchvision layout under a root folder, through ``torchvision.datasets`` so that its md5
checks apply, and returns uint8 images (N, 3, S, S) and int64 labels (N,). A dataset that
is missing (or corrupted, or cannot be downloaded) raises ``DatasetUnavailable`` with one
line saying what was expected where and how to get it.

``interpolate_pairs`` builds the "CIFAR-10 Interp" OOD set, ``train_val_split`` a
stratified validation split, and ``save_split`` / ``load_split`` store one split as an
uncompressed ``.npz`` file, written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jem.config.errors import InputError
from jem.runtime.files import atomic_write


class DatasetUnavailable(InputError):
    """A dataset is not under the configured root and cannot be downloaded. Message is ONE line."""


TORCHVISION_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "celeba")
SPLITS = ("train", "test")

_CELEBA_FILES = ("list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                 "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")


def _describe(name: str, root: str, split: str) -> tuple[str, str, str]:
    """(title, files expected under root, where to get them) for the error message."""
    if name == "cifar10":
        return ("CIFAR-10", f"{os.path.join(root, 'cifar-10-batches-py')}/ (data_batch_1..5, test_batch, batches.meta)",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it into the root)")
    if name == "cifar100":
        return ("CIFAR-100", f"{os.path.join(root, 'cifar-100-python')}/ (train, test, meta)",
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it into the root)")
    if name == "svhn":
        return ("SVHN", os.path.join(root, f"{split}_32x32.mat"),
                f"http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat")
    return ("CelebA", f"{os.path.join(root, 'celeba')}/ (img_align_celeba/*.jpg, {', '.join(_CELEBA_FILES)})",
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images and annotation files)")


def _unavailable(name: str, root: str, split: str, download_error: BaseException | None) -> DatasetUnavailable:
    title, expected, source = _describe(name, root, split)
    msg = f"{title} ({split}) is missing or corrupted under {root}: expected {expected}; "
    if download_error is not None:
        reason = " ".join(str(download_error).split()) or "no details"
        msg += f"download failed ({type(download_error).__name__}: {reason}); "
    msg += (f"get it from {source}, then set data.root in params.yaml to the folder that holds it, "
            "or set data.download: true")
    return DatasetUnavailable(msg)


def _open(name: str, root: str, split: str, download: bool, factory: Callable[[bool], Any]) -> Any:
    """Build the torchvision dataset, turning 'not found / corrupted / download failed' into one error."""
    if download:
        try:
            return factory(True)
        except Exception as exc:  # network, md5 mismatch, missing gdown, bad archive...
            raise _unavailable(name, root, split, exc) from exc
    try:
        return factory(False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise _unavailable(name, root, split, None) from exc


def _resize(images: np.ndarray, size: int | tuple[int, int], chunk: int = 512) -> np.ndarray:
    """Antialiased bilinear resize of uint8 (N, C, H, W) to (N, C, size, size) (or (H', W') = size), uint8."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if images.shape[-2:] == hw:
        return images
    out = np.empty((*images.shape[:2], *hw), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).float()
        y = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


CELEBA_CROPS = ("center", "none")


def _load_celeba(ds: Any, image_size: int, crop: str = "center") -> np.ndarray:
    """``center``: the centre square, resized to ``image_size``; ``none``: the whole image with
    its shorter side resized to ``image_size`` (torchvision ``Resize(32)``, as the reference
    code: 178x218 -> 32 wide, 39 high)."""
    folder = Path(ds.root) / ds.base_folder / "img_align_celeba"
    out: np.ndarray | None = None
    for k, fname in enumerate(ds.filename):
        with Image.open(folder / fname) as img:
            rgb = img.convert("RGB")
            if crop == "center":
                rgb = _center_square(rgb)
            w, h = rgb.size
            hw = (image_size, image_size) if crop == "center" else (
                (int(image_size * h / w), image_size) if w <= h else (image_size, int(image_size * w / h)))
            pixels = np.asarray(rgb).transpose(2, 0, 1)[None]
        if out is None:
            out = np.empty((len(ds.filename), 3, *hw), dtype=np.uint8)
        elif out.shape[-2:] != hw:
            raise InputError(f"CelebA {fname}: {w}x{h} gives {hw[1]}x{hw[0]} uncropped, unlike the first image's "
                             f"{out.shape[-1]}x{out.shape[-2]}; use crop: center")
        out[k] = _resize(pixels, hw)[0]
    return out if out is not None else np.empty((0, 3, image_size, image_size), dtype=np.uint8)


def load_torchvision(name: str, root: str | os.PathLike[str], split: str, download: bool = False,
                     image_size: int = 32, crop: str = "center") -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3, image_size, image_size) and labels as int64 (N,).

    ``name`` is one of ``TORCHVISION_DATASETS``, ``split`` is "train" or "test". Files are
    read from the standard torchvision layout under ``root`` (downloaded there first when
    ``download`` is true and they are missing); torchvision's integrity checks apply.
    CelebA is centre-cropped to a square (``crop="center"``) or keeps its aspect ratio with the
    shorter side at ``image_size`` (``crop="none"``, the reference code's ``Resize(32)``: 39x32),
    and gets labels of zeros (it is only an OOD set);
    the others are resized only when their native size differs from ``image_size``.
    Raises ``DatasetUnavailable`` (one line) when the files are missing or corrupted, or
    the download fails.
    """
    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(TORCHVISION_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    from torchvision import datasets as tvd  # imported here: it costs seconds at start-up

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        ds = _open(name, root, split, download, lambda dl: cls(root, train=split == "train", download=dl))
        images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        labels = np.asarray(ds.targets, dtype=np.int64)
    elif name == "svhn":
        ds = _open(name, root, split, download, lambda dl: tvd.SVHN(root, split=split, download=dl))
        images = np.ascontiguousarray(ds.data)  # already NCHW
        labels = np.asarray(ds.labels, dtype=np.int64).reshape(-1)  # torchvision maps digit 0 ('10') to 0
    else:
        ds = _open(name, root, split, download,
                   lambda dl: tvd.CelebA(root, split=split, target_type=[], download=dl))
        if crop not in CELEBA_CROPS:
            raise ValueError(f"unknown crop {crop!r}; expected one of {', '.join(CELEBA_CROPS)}")
        return _load_celeba(ds, image_size, crop), np.zeros(len(ds.filename), dtype=np.int64)
    return _resize(images, image_size), labels


def interpolate_pairs(images: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """The "CIFAR-10 Interp" OOD set: averages of ``n`` random pairs of different images (i != j).

    ``n`` defaults to ``len(images)``. Averages are rounded half to even (unbiased) back to
    uint8. Deterministic in ``seed``.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"interpolate_pairs needs uint8 images, got {images.dtype}")
    count = len(images)
    if count < 2:
        raise ValueError(f"interpolate_pairs needs at least 2 images, got {count}")
    n = count if n is None else n
    if n < 0:
        raise ValueError(f"number of pairs must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, count, size=n)
    second = rng.integers(0, count - 1, size=n)
    second += second >= first  # uniform over the other count - 1 images
    out = np.empty((n, *images.shape[1:]), dtype=np.uint8)
    chunk = 4096
    for start in range(0, n, chunk):
        s = images[first[start:start + chunk]].astype(np.uint16) + images[second[start:start + chunk]]
        half = s >> 1
        out[start:start + chunk] = half + (s & half & 1)  # .5 rounds up only when half is odd
    return out


def subset_indices(total: int, limit: int | None, seed: int) -> np.ndarray | None:
    """The sorted positions of ``limit`` of ``total`` items, drawn without replacement by a generator
    seeded with ``seed``: how a prepared split, the FID reference and the evaluated test and OOD sets
    are cut down. None when ``limit`` keeps every item (None, or not below ``total``)."""
    if limit is None or limit >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def train_val_split(labels: np.ndarray, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint index arrays (train_idx, val_idx) covering ``range(len(labels))``.

    The validation set is stratified: class c gets ``val_size * n_c / N`` rounded by largest
    remainder, so the counts sum to exactly ``val_size``. Deterministic in ``seed``.
    """
    labels = np.asarray(labels).reshape(-1)
    total = len(labels)
    if not 0 <= val_size < total:
        raise ValueError(f"val_size must be in [0, {total}) for {total} labelled images, got {val_size}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota, remainder = np.divmod(val_size * counts, total)
    short = val_size - int(quota.sum())
    quota[np.argsort(-remainder, kind="stable")[:short]] += 1  # largest remainders, ties by class order
    rng = np.random.default_rng(seed)
    val_parts = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(quota)]
    val_idx = np.sort(np.concatenate([np.empty(0, dtype=np.int64), *val_parts]).astype(np.int64))
    in_val = np.zeros(total, dtype=bool)
    in_val[val_idx] = True
    return np.flatnonzero(~in_val).astype(np.int64), val_idx


def _check_split(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InputError(f"{where}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise InputError(f"{where}: labels must be int64 (N,), got {labels.dtype} {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise InputError(f"{where}: {len(images)} images but {len(labels)} labels")


def save_split(path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray) -> None:
    """Write one uncompressed ``.npz`` with arrays 'images' and 'labels' to exactly ``path``, atomically."""
    path = Path(path)
    _check_split(images, labels, str(path))
    # a file object, so numpy appends no ".npz" to the name
    atomic_write(path, lambda fh: np.savez(fh, images=images, labels=labels))


def load_split(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (images, labels) written by ``save_split``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is produced by the prepare stage (run dvc repro prepare)")
    with np.load(path, allow_pickle=False) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise InputError(f"{path}: not a saved split, missing arrays {sorted(missing)}")
        images, labels = archive["images"], archive["labels"]
    _check_split(images, labels, str(path))
    return images, labels
