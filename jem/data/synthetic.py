"""Procedural image datasets the project makes itself (no download, deterministic in the seed).

* ``shapes``: 10 classes of coloured geometric figures (disk, square, triangle, ring, X,
  plus, horizontal stripes, vertical stripes, diamond, checkerboard) at random position,
  scale, rotation and colours, with an anti-aliased edge, a background gradient and
  pixel noise. The class is carried by the shape alone, never by colour, so a small
  WRN must learn shape features; samples of a working EBM are recognisable figures.
* ``glyphs``: ten other figures (star, crescent, L, T, arrow, hexagon, ellipse, half disk,
  hourglass, two dots) drawn the same way: a near-OOD family for ``shapes``, as CIFAR-100
  is for CIFAR-10.
* ``clouds``: smooth random colour fields (low-pass-filtered noise), no figure at all: a
  far-OOD family, as SVHN is for CIFAR-10.
* ``gratings``: sums of oriented colour sine gratings: another far-OOD texture family.

Images are uint8 (N, 3, H, W), the same layout as the prepared real datasets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SHAPE_CLASSES = ("disk", "square", "triangle", "ring", "x", "plus", "hstripes", "vstripes",
                 "diamond", "checker")
GLYPH_CLASSES = ("star", "crescent", "L", "T", "arrow", "hexagon", "ellipse", "half-disk", "hourglass",
                 "two-dots")


def _box(x: torch.Tensor, y: torch.Tensor, half: float) -> torch.Tensor:
    return torch.maximum(x.abs(), y.abs()) - half


def _circle(x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, r: float) -> torch.Tensor:
    return torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r


def _rect(x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, hw: float, hh: float) -> torch.Tensor:
    return torch.maximum((x - cx).abs() - hw, (y - cy).abs() - hh)


def _shape_sdf(kind: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of ``shapes`` class ``kind`` in shape-local coordinates."""
    r = torch.sqrt(x * x + y * y)
    if kind == 0:  # disk
        return r - 0.95
    if kind == 1:  # square
        return _box(x, y, 0.8)
    if kind == 2:  # triangle, pointing up (y grows downwards in images)
        s = math.sqrt(3) / 2
        return torch.maximum(torch.maximum(y - 0.55, s * x - 0.5 * y - 0.55), -s * x - 0.5 * y - 0.55)
    if kind == 3:  # ring
        return (r - 0.72).abs() - 0.22
    if kind == 4:  # X
        arms = torch.minimum((x - y).abs(), (x + y).abs()) / math.sqrt(2) - 0.2
        return torch.maximum(arms, _box(x, y, 0.85))
    if kind == 5:  # plus
        return torch.minimum(_rect(x, y, 0, 0, 0.22, 0.9), _rect(x, y, 0, 0, 0.9, 0.22))
    if kind == 6:  # horizontal stripes in a square
        return torch.maximum(_box(x, y, 0.85), 0.25 * torch.sin(y * math.pi * 2.2))
    if kind == 7:  # vertical stripes in a square
        return torch.maximum(_box(x, y, 0.85), 0.25 * torch.sin(x * math.pi * 2.2))
    if kind == 8:  # diamond
        return (x.abs() + y.abs()) - 1.0
    if kind == 9:  # checkerboard in a square
        return torch.maximum(_box(x, y, 0.85),
                             0.25 * torch.sin(x * math.pi * 1.6) * torch.sin(y * math.pi * 1.6))
    raise ValueError(f"unknown shape class {kind}")


def _glyph_sdf(kind: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ten other figures (a near-OOD family for models trained on ``shapes``)."""
    r = torch.sqrt(x * x + y * y)
    theta = torch.atan2(y, x)
    if kind == 0:  # five-pointed star
        return r - (0.62 + 0.3 * torch.cos(5 * theta + math.pi / 2))
    if kind == 1:  # crescent
        return torch.maximum(r - 0.9, -_circle(x, y, 0.4, -0.15, 0.7))
    if kind == 2:  # L
        return torch.minimum(_rect(x, y, -0.55, 0, 0.22, 0.85), _rect(x, y, 0, 0.63, 0.77, 0.22))
    if kind == 3:  # T
        return torch.minimum(_rect(x, y, 0, -0.63, 0.85, 0.22), _rect(x, y, 0, 0.1, 0.22, 0.75))
    if kind == 4:  # arrow pointing right
        head = torch.maximum(x - 0.85, (y.abs() + 0.9 * (x - 0.85)) / 1.35 + 0.05)
        return torch.minimum(_rect(x, y, -0.3, 0, 0.55, 0.18), torch.maximum(head, -x - 0.05))
    if kind == 5:  # hexagon
        return torch.maximum(y.abs(), x.abs() * math.sqrt(3) / 2 + y.abs() * 0.5) - 0.8
    if kind == 6:  # wide ellipse
        return 0.5 * (torch.sqrt(x * x + (y / 0.45) ** 2) - 1.0)
    if kind == 7:  # half disk
        return torch.maximum(r - 0.95, y - 0.15)
    if kind == 8:  # hourglass
        return torch.maximum(x.abs() - y.abs() * 0.9 - 0.05, y.abs() - 0.85)
    if kind == 9:  # two dots
        return torch.minimum(_circle(x, y, -0.48, 0, 0.38), _circle(x, y, 0.48, 0, 0.38))
    raise ValueError(f"unknown glyph class {kind}")


FAMILIES = {"shapes": (SHAPE_CLASSES, _shape_sdf), "glyphs": (GLYPH_CLASSES, _glyph_sdf)}


def make_shapes(n: int, image_size: int = 32, num_classes: int = 10, seed: int = 0,
                noise: float = 0.03, family: str = "shapes") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8, N x 3 x H x W) of a figure family with balanced labels 0..num_classes-1."""
    if family not in FAMILIES:
        raise ValueError(f"unknown figure family {family!r}; known: {', '.join(FAMILIES)}")
    names, sdf = FAMILIES[family]
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in [2, {len(names)}], got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1
    v, u = torch.meshgrid(coords, coords, indexing="ij")  # v: rows (down), u: columns
    cx = (torch.rand(n, generator=g) - 0.5) * 0.5
    cy = (torch.rand(n, generator=g) - 0.5) * 0.5
    scale = 0.5 + 0.3 * torch.rand(n, generator=g)
    angle = (torch.rand(n, generator=g) - 0.5) * (math.pi / 6)
    du = u[None] - cx[:, None, None]
    dv = v[None] - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    x = (cos * du + sin * dv) / scale[:, None, None]
    y = (-sin * du + cos * dv) / scale[:, None, None]
    dist = torch.empty(n, image_size, image_size)
    for k in range(num_classes):
        rows = labels == k
        if rows.any():
            dist[rows] = sdf(k, x[rows], y[rows])
    pixel = 2.0 / image_size / scale[:, None, None]  # one pixel in local units
    mask = torch.sigmoid(-dist / (0.5 * pixel))[:, None]
    fg = torch.rand(n, 3, 1, 1, generator=g)
    bg = torch.remainder(fg + 0.5 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.4, 1.0)
    slope = (torch.rand(n, 2, generator=g) - 0.5) * 0.3
    gradient = (slope[:, 0, None, None] * u[None] + slope[:, 1, None, None] * v[None])[:, None]
    img = mask * fg + (1 - mask) * (bg + gradient)
    img = img + noise * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


def make_clouds(n: int, image_size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields: an OOD family with no figure (uint8, N x 3 x H x W)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    fine = torch.rand(n, 3, 8, 8, generator=g)
    img = 0.75 * F.interpolate(coarse, size=image_size, mode="bicubic", align_corners=False)
    img = img + 0.25 * F.interpolate(fine, size=image_size, mode="bicubic", align_corners=False)
    img = img + 0.02 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def make_gratings(n: int, image_size: int = 32, seed: int = 0) -> torch.Tensor:
    """Sums of two oriented sine gratings in random colours (uint8, N x 3 x H x W)."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    img = torch.zeros(n, 3, image_size, image_size)
    for _ in range(2):
        angle = torch.rand(n, generator=g) * math.pi
        freq = 1.5 + 4.0 * torch.rand(n, generator=g)
        phase = torch.rand(n, generator=g) * 2 * math.pi
        proj = torch.cos(angle)[:, None, None] * u + torch.sin(angle)[:, None, None] * v
        wave = torch.sin(math.pi * freq[:, None, None] * proj + phase[:, None, None])
        colour = torch.rand(n, 3, 1, 1, generator=g) - 0.5
        img = img + 0.5 * colour * wave[:, None]
    img = 0.5 + img + 0.02 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)
