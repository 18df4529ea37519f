"""Built-in datasets that need no download, written once as JPEG ImageFolder trees.

``builtin:digits``  scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes),
                    upscaled to 64 px and stored as RGB, split 80/20 into train/val.
``builtin:shapes``  procedurally generated images, 10 classes of dark shapes and textures on a light
                    background (random grey levels, positions, sizes, orientations; 64-224 px),
                    100 train + 20 val per class.  Grey, not coloured: two crops of one image share
                    its colours, which DINO-style colour jitter does not hide, so on random colours
                    self-distillation learns colour instead of shape (measured: DINO with a BatchNorm
                    head, 12 epochs, k-NN top-1 13.0% untrained -> 13.5% trained on random colours,
                    35.5% -> 43.5% on these grey images).

Both are written as JPEG files (so DALI's file reader and decoder are exercised exactly as on a
real dataset) under ``<cache_dir>/builtin/<name>-v<version>``.  Generation is deterministic from a
fixed seed and atomic: the tree is written into a temporary sibling directory and renamed into
place, so a crash never leaves half a dataset, and concurrent writers (several DDP ranks) are
harmless: the first rename wins and the others discard their copy.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np

BUILTIN_DATASETS = ("digits", "shapes")
_VERSION = {"digits": 1, "shapes": 2}
_SEED = 20250601
JPEG_QUALITY = 92

SHAPE_CLASSES = (
    "circle", "square", "triangle", "star", "cross", "ring", "stripes", "checker", "dots", "gradient",
)


def builtin_root(name: str, cache_dir: str) -> str:
    return os.path.join(os.path.expanduser(cache_dir), "builtin", f"{name}-v{_VERSION[name]}")


def ensure_builtin(name: str, cache_dir: str) -> str:
    """Path of the ImageFolder root for ``builtin:name``, generating it on first use."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {BUILTIN_DATASETS}")
    root = builtin_root(name, cache_dir)
    if os.path.isfile(os.path.join(root, "manifest.json")):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=parent)
    try:
        counts = _GENERATORS[name](tmp)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"name": name, "version": _VERSION[name], "seed": _SEED, "counts": counts}, f)
        try:
            os.rename(tmp, root)
        except OSError:
            # Someone else finished first (rename onto a non-empty directory fails): use theirs.
            if not os.path.isfile(os.path.join(root, "manifest.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _save(img_rgb: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(img_rgb).save(path, format="JPEG", quality=JPEG_QUALITY)


def _write_digits(out: str) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target
    order = np.random.default_rng(_SEED).permutation(len(images))
    n_val = len(images) // 5
    counts = {"train": 0, "val": 0}
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        class_dir = os.path.join(out, split, str(int(labels[i])))
        os.makedirs(class_dir, exist_ok=True)
        big = Image.fromarray(images[i]).resize((64, 64), Image.BILINEAR)
        rgb = np.repeat(np.asarray(big)[:, :, None], 3, axis=2)
        _save(rgb, os.path.join(class_dir, f"{int(i):05d}.jpg"))
        counts[split] += 1
    return counts


def _grey_levels(rng: np.random.Generator) -> tuple:
    """(background, foreground) RGB greys: a light background and a dark shape, contrast >= 50."""
    bg = int(rng.integers(150, 256))
    fg = int(rng.integers(0, 100))
    return (bg,) * 3, (fg,) * 3


def _polygon(cx, cy, radius, n, angle, inner=None):
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        r = inner if inner and k % 2 else radius
        a = angle + 2 * math.pi * k / steps
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_shape(cls: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(64, 225, 2))
    bg, fg = _grey_levels(rng)
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    radius = side * rng.uniform(0.2, 0.4)
    cx = rng.uniform(radius, w - radius)
    cy = rng.uniform(radius, h - radius)
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if cls == "circle":
        draw.ellipse(box, fill=fg)
    elif cls == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=fg)
    elif cls == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=fg)
    elif cls == "star":
        draw.polygon(_polygon(cx, cy, radius, 5, angle, inner=radius * 0.45), fill=fg)
    elif cls == "cross":
        t = radius * 0.3
        draw.rectangle((cx - radius, cy - t, cx + radius, cy + t), fill=fg)
        draw.rectangle((cx - t, cy - radius, cx + t, cy + radius), fill=fg)
    elif cls == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(radius * 0.3)))
    elif cls == "stripes":
        period = int(rng.integers(6, 20))
        vertical = rng.random() < 0.5
        for p in range(0, (w if vertical else h), period):
            if vertical:
                draw.rectangle((p, 0, p + period // 2, h), fill=fg)
            else:
                draw.rectangle((0, p, w, p + period // 2), fill=fg)
    elif cls == "checker":
        cell = int(rng.integers(6, 24))
        for y in range(0, h, cell):
            for x in range(0, w, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fg)
    elif cls == "dots":
        r = max(2, side // 24)
        for _ in range(int(rng.integers(12, 40))):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fg)
    elif cls == "gradient":
        t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h)
        a, b = np.array(bg, float), np.array(fg, float)
        ramp = (a[None] * (1 - t[:, None]) + b[None] * t[:, None]).astype(np.uint8)
        arr = np.broadcast_to(ramp[None], (h, w, 3)) if len(t) == w else np.broadcast_to(ramp[:, None], (h, w, 3))
        img = Image.fromarray(np.ascontiguousarray(arr))
    else:  # pragma: no cover - SHAPE_CLASSES is fixed
        raise AssertionError(cls)
    arr = np.asarray(img).astype(np.int16)
    # Mild sensor-like noise so that JPEG blocks and blur have something to act on.
    arr += rng.integers(-12, 13, arr.shape, dtype=np.int16)
    return arr.clip(0, 255).astype(np.uint8)


def _write_shapes(out: str, per_class=(("train", 100), ("val", 20))) -> dict:
    rng = np.random.default_rng(_SEED)
    counts = {}
    for split, n in per_class:
        counts[split] = 0
        for cls in SHAPE_CLASSES:
            class_dir = os.path.join(out, split, cls)
            os.makedirs(class_dir, exist_ok=True)
            for k in range(n):
                _save(_draw_shape(cls, rng), os.path.join(class_dir, f"{k:04d}.jpg"))
                counts[split] += 1
    return counts


_GENERATORS = {"digits": _write_digits, "shapes": _write_shapes}
