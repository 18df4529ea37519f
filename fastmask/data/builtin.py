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
``builtin:objects``  procedurally generated scenes for the paired ablations of ``fastmask.reproduce``:
                    one class-bearing object (10 shapes) over a cluttered, class-independent
                    background, at a configurable size, resolution and therefore patch count
                    (see :func:`_draw_object_scene` for why this design lets attention-guided masking
                    matter).

Options follow the name, comma-separated: ``builtin:objects,res=96,train=300,val=100`` (``res`` is the
side in pixels, ``train``/``val`` the images per class); ``builtin:shapes,train=200,val=50`` works the
same way (``shapes`` has no ``res``: its sizes vary, 64-224 px).  Each distinct set of options is its
own cached tree; the defaults keep the original folder names.

"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np

BUILTIN_DATASETS = ("digits", "shapes", "objects")
_VERSION = {"digits": 1, "shapes": 2, "objects": 2}
# Options each dataset takes (name -> default); ``digits`` is a fixed dataset.
_OPTIONS = {
    "digits": {},
    "shapes": {"train": 100, "val": 20},
    "objects": {"res": 64, "train": 300, "val": 100},
}
_OPTION_RANGES = {"res": (32, 512), "train": (1, 100000), "val": (1, 100000)}
_SEED = 20250601
JPEG_QUALITY = 92

SHAPE_CLASSES = (
    "circle", "square", "triangle", "star", "cross", "ring", "stripes", "checker", "dots", "gradient",
)


def parse_builtin(spec: str) -> tuple:
    """``"objects,res=96,train=300"`` -> ``("objects", {"res": 96, "train": 300})`` (only the options
    given; the others take their defaults).  Unknown names, options or values are a ValueError."""
    name, *items = [part.strip() for part in spec.split(",")]
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {BUILTIN_DATASETS}")
    opts = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in _OPTIONS[name]:
            known = ", ".join(f"{k}=N" for k in _OPTIONS[name]) or "none"
            raise ValueError(f"builtin:{spec}: bad option {item!r} for {name!r} (options: {known})")
        try:
            opts[key] = int(value)
        except ValueError:
            raise ValueError(f"builtin:{spec}: option {key} must be an integer, got {value!r}") from None
        lo, hi = _OPTION_RANGES[key]
        if not lo <= opts[key] <= hi:
            raise ValueError(f"builtin:{spec}: option {key} must lie in [{lo}, {hi}], got {opts[key]}")
    return name, opts


def builtin_root(spec: str, cache_dir: str) -> str:
    name, opts = parse_builtin(spec)
    full = {**_OPTIONS[name], **opts}
    # Default options keep the historical folder name (caches written before options existed stay valid).
    tag = "".join(f"-{k}{full[k]}" for k in sorted(full)) if full != _OPTIONS[name] or name == "objects" else ""
    return os.path.join(os.path.expanduser(cache_dir), "builtin", f"{name}{tag}-v{_VERSION[name]}")


def ensure_builtin(spec: str, cache_dir: str) -> str:
    """Path of the ImageFolder root for ``builtin:spec`` (a name, optionally followed by options),
    generating it on first use."""
    name, opts = parse_builtin(spec)
    root = builtin_root(spec, cache_dir)
    if os.path.isfile(os.path.join(root, "manifest.json")):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=parent)
    try:
        counts = _GENERATORS[name](tmp, **opts)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"name": name, "version": _VERSION[name], "seed": _SEED, "counts": counts,
                       "options": {**_OPTIONS[name], **opts}}, f)
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


def _write_shapes(out: str, train: int = 100, val: int = 20) -> dict:
    per_class = (("train", train), ("val", val))
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



# ------------------------------------------------------------------------------------------------
# builtin:objects

OBJECT_CLASSES = (
    "circle", "square", "triangle", "hexagon", "star", "cross", "ring", "crescent", "arrow", "tee",
)
# Each class also has its own surface pattern, drawn only inside the object (see _draw_object_scene).
OBJECT_TEXTURES = dict(zip(OBJECT_CLASSES, (
    "solid", "hstripes", "vstripes", "diag", "antidiag", "checker", "dots", "grid", "radial", "speckle",
)))


def _texture(kind: str, side: int, cx: float, cy: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [side, side] pattern (period side/16: two periods per 8 px patch at 64 px), random phase."""
    period = max(2.0, side / 16)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    x, y = x + rng.uniform(0, period), y + rng.uniform(0, period)
    half = lambda t: (t % period) < period / 2
    if kind == "solid":
        return np.zeros((side, side), bool)
    if kind == "hstripes":
        return half(y)
    if kind == "vstripes":
        return half(x)
    if kind == "diag":
        return half((x + y) / math.sqrt(2))
    if kind == "antidiag":
        return half((x - y + side) / math.sqrt(2))
    if kind == "checker":
        return half(x) ^ half(y)
    if kind == "dots":
        return ((x % period) - period / 2) ** 2 + ((y % period) - period / 2) ** 2 < (period / 3.2) ** 2
    if kind == "grid":
        return ((x % period) < period / 4) | ((y % period) < period / 4)
    if kind == "radial":
        return half(np.hypot(x - cx, y - cy))
    if kind == "speckle":
        return rng.random((side, side)) < 0.35
    raise AssertionError(kind)  # pragma: no cover - OBJECT_TEXTURES is fixed


def _object_mask(cls: str, side: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean [side, side] footprint of one object of class ``cls`` (centre, radius, rotation)."""
    from PIL import Image, ImageDraw

    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    box = (cx - r, cy - r, cx + r, cy + r)
    rot = lambda pts: [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                       for x, y in pts]
    if cls == "circle":
        d.ellipse(box, fill=255)
    elif cls == "square":
        d.polygon(_polygon(cx, cy, r, 4, angle), fill=255)
    elif cls == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, angle), fill=255)
    elif cls == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, angle), fill=255)
    elif cls == "star":
        d.polygon(_polygon(cx, cy, r, 5, angle, inner=r * 0.42), fill=255)
    elif cls == "cross":
        t = r * 0.32
        d.polygon(rot([(-r, -t), (r, -t), (r, t), (-r, t)]), fill=255)
        d.polygon(rot([(-t, -r), (t, -r), (t, r), (-t, r)]), fill=255)
    elif cls == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif cls == "crescent":
        d.ellipse(box, fill=255)
        ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        d.ellipse((cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r), fill=0)
    elif cls == "arrow":
        t = r * 0.28
        d.polygon(rot([(-r, -t), (0.1 * r, -t), (0.1 * r, -0.75 * r), (r, 0), (0.1 * r, 0.75 * r),
                       (0.1 * r, t), (-r, t)]), fill=255)
    elif cls == "tee":
        t = r * 0.3
        d.polygon(rot([(-r, -r), (r, -r), (r, -r + 2 * t), (-r, -r + 2 * t)]), fill=255)
        d.polygon(rot([(-t, -r), (t, -r), (t, r), (-t, r)]), fill=255)
    else:  # pragma: no cover - OBJECT_CLASSES is fixed
        raise AssertionError(cls)
    return np.asarray(m) > 127


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _draw_object_scene(cls: str, side: int, rng: np.random.Generator) -> tuple:
    """One ``side`` x ``side`` RGB scene: a class-``cls`` object over clutter, and its footprint.

    Why attention-guided masking can matter on these images (and could not on ``builtin:shapes``):

    * the class lives in one place.  The object (radius 0.22-0.34 of the side) covers 16% of the
      image on average (up to ~34%): at 64 px / 8 px patches it touches 9-32 of the 64 patches (20
      on average), the rest is background.  A network that has learnt the task attends to those
      patches, so the CLS map is peaked on the evidence, as on natural object-centric photos;
    * the background is busy but says nothing about the class: a smooth random colour field plus
      6-12 distractors (line segments, small blobs, small hollow squares) in random colours whose
      number, kinds, sizes and positions are drawn independently of the class.  Distractors resemble
      *parts* of objects (an edge, a corner, a dot) but are 3-6x smaller than any object, so a patch
      in the background is locally object-like yet uninformative;
    * colour carries no class information (object and distractor colours are random; the object only
      differs from its surroundings by at least 120 in RGB distance so it stays visible).  The
      evidence is the object's shape, which needs several neighbouring patches together, and its
      class-specific surface pattern (stripes of one orientation, checker, dots, ...; period side/16,
      so every object patch shows it), which only object patches carry.

    Sizes were set for learnability, before any ordering result: on v1 (shape alone, radius
    0.16-0.28, 10-18 distractors) a supervised 4-block ViT stayed at chance (loss 2.30) for 186
    steps, and with the pattern added still for 93; with these sizes its loss falls to 2.12 in 93
    steps (shapes: 1.86 in 30), so effects of a few hundred steps can show.

    Hence: hiding the most-attended patches (AttMask-High) removes the object and leaves a pretext
    task that has to reason from context, hiding the least-attended ones (Low) removes only clutter;
    a teacher that sees the student's most-attended half of the patches (MaskedKD) still sees the
    object, while a random half drops part of it.  Whether those differences move accuracy at the
    scale we can afford is what ``python -m fastmask.reproduce`` measures; the design only makes it
    possible.
    """
    from PIL import Image, ImageDraw

    # Smooth background: random colours on a coarse grid, bilinearly upsampled.
    g = int(rng.integers(2, 5))
    coarse = rng.integers(40, 216, (g, g, 3)).astype(np.uint8)
    bg = Image.fromarray(coarse).resize((side, side), Image.BILINEAR)
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(6, 13))):
        kind = int(rng.integers(0, 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, side, 2)
        s = side * rng.uniform(0.03, 0.06)
        if kind == 0:  # line segment
            a = rng.uniform(0, math.pi)
            length = side * rng.uniform(0.08, 0.2)
            draw.line((x, y, x + length * math.cos(a), y + length * math.sin(a)), fill=colour,
                      width=int(rng.integers(1, max(2, side // 32) + 1)))
        elif kind == 1:  # small blob
            draw.ellipse((x - s, y - s, x + s, y + s), fill=colour)
        else:  # small hollow square
            draw.rectangle((x - s, y - s, x + s, y + s), outline=colour, width=max(1, side // 48))
    arr = np.asarray(bg).astype(np.float32)

    r = side * rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(r, side - r, 2)
    mask = _object_mask(cls, side, cx, cy, r, rng.uniform(0, 2 * math.pi))
    around = arr[mask].mean(axis=0) if mask.any() else arr.reshape(-1, 3).mean(axis=0)
    colour = _random_colour(rng)
    for _ in range(32):  # visible against what it covers
        if np.linalg.norm(colour - around) >= 120:
            break
        colour = _random_colour(rng)
    # Pattern colour: the object colour darkened (light objects) or lightened (dark ones).
    second = colour * 0.35 if colour.mean() > 110 else colour * 0.35 + 255 * 0.65
    pattern = _texture(OBJECT_TEXTURES[cls], side, cx, cy, rng)
    surface = np.where(pattern[:, :, None], second[None, None], colour[None, None])
    arr = np.where(mask[:, :, None], surface, arr)
    arr += rng.normal(0.0, 6.0, arr.shape).astype(np.float32)
    return arr.clip(0, 255).astype(np.uint8), mask


def _write_objects(out: str, res: int = 64, train: int = 300, val: int = 100) -> dict:
    counts = {}
    # One generator per (split, class): growing a split never changes the images already in it.
    for split_id, (split, n) in enumerate((("train", train), ("val", val))):
        counts[split] = 0
        for class_id, cls in enumerate(OBJECT_CLASSES):
            rng = np.random.default_rng([_SEED, res, split_id, class_id])
            class_dir = os.path.join(out, split, cls)
            os.makedirs(class_dir, exist_ok=True)
            for k in range(n):
                _save(_draw_object_scene(cls, res, rng)[0], os.path.join(class_dir, f"{k:05d}.jpg"))
                counts[split] += 1
    return counts


_GENERATORS = {"digits": _write_digits, "shapes": _write_shapes, "objects": _write_objects}
