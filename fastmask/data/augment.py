"""What each pipeline does to an image, written once and read by both backends.

The DALI graph (``dali_loader.py``) and the torchvision pipeline (``torch_loader.py``) are both
built from the spec objects below, so the two loaders share the crop sizes, scale ranges and the
probability and parameter range of every augmentation by construction.  This module also holds
the PyTorch versions of the pixel ops, written to follow DALI's definitions (not torchvision's
``ColorJitter``) so that an image augmented with the same parameters comes out the same from
either backend:

* colour jitter is one affine map in RGB, as in DALI's ``color_twist``: hue rotates and
  saturation scales the chroma (I, Q) plane of YIQ, contrast scales around mid-grey and
  brightness multiplies.  Grayscale is ``saturation = 0`` of the same map (YIQ luma uses the
  ITU-R 601 weights that torchvision's ``rgb_to_grayscale`` also uses), so "jitter with p then
  grayscale with p" is a single op whose parameters are drawn per sample.
* Gaussian blur has sigma drawn in pixels and a window of ``2 * ceil(3 * sigma) + 1``, DALI's
  default, with reflect-101 borders (torchvision's ``gaussian_blur`` pads the same way).
* solarisation inverts pixels ``>= 128`` (torchvision's ``solarize`` threshold convention).

Images travel as uint8 between ops, as in DALI, so each op rounds and clamps its output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Solarisation threshold on the 0..255 scale; a threshold above 255 switches the op off, which is
# how the DALI graph makes it per-sample without branching.
SOLARIZE_THRESHOLD = 128.0
# Sigma used for "no blur" in the DALI graph: its window is 1 pixel wide, i.e. the identity.
NO_BLUR_SIGMA = 1e-6
BLUR_SIGMA = (0.1, 2.0)
ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class ColorJitterSpec:
    """Colour jitter applied with probability ``prob``, then grayscale with ``grayscale_prob``.

    ``brightness``/``contrast``/``saturation`` are torchvision-style strengths: the factor is drawn
    from ``U(1 - s, 1 + s)``.  ``hue`` is a fraction of the colour circle (0.1 = +-36 degrees).
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    prob: float = 0.8
    grayscale_prob: float = 0.2


@dataclass(frozen=True)
class CropSpec:
    """One random-resized crop and what happens to it after the crop."""

    size: int
    scale: Tuple[float, float]
    jitter: Optional[ColorJitterSpec]
    blur_prob: float = 0.0
    solarize_prob: float = 0.0
    flip_prob: float = 0.5


@dataclass(frozen=True)
class ThreeAugmentSpec:
    """DeiT-III "3-Augment": one of grayscale / solarisation / blur, then colour jitter (p = 1)."""

    jitter: float = 0.3


@dataclass(frozen=True)
class SupervisedSpec:
    size: int
    scale: Tuple[float, float] = (0.08, 1.0)
    three_augment: Optional[ThreeAugmentSpec] = None
    flip_prob: float = 0.5


@dataclass(frozen=True)
class EvalSpec:
    size: int
    crop_pct: float = 0.875

    @property
    def resize_shorter(self) -> int:
        return int(round(self.size / self.crop_pct))


NUM_GLOBAL_CROPS = 2  # DINO's two global views; the multi-crop loaders always emit them first


def multicrop_specs(
    global_size: int,
    local_size: int,
    num_local_crops: int,
    global_scale: Sequence[float],
    local_scale: Sequence[float],
    jitter: ColorJitterSpec = ColorJitterSpec(),
) -> Tuple[CropSpec, ...]:
    """DINO's multi-crop: global views blurred with p 1.0 and 0.1 (+ solarisation 0.2 on the
    second), local views blurred with p 0.5.  Globals come first."""
    g_scale = (float(global_scale[0]), float(global_scale[1]))
    l_scale = (float(local_scale[0]), float(local_scale[1]))
    crops = [
        CropSpec(global_size, g_scale, jitter, blur_prob=1.0),
        CropSpec(global_size, g_scale, jitter, blur_prob=0.1, solarize_prob=0.2),
    ]
    crops += [CropSpec(local_size, l_scale, jitter, blur_prob=0.5) for _ in range(num_local_crops)]
    return tuple(crops)


# ----------------------------------------------------------------------------------------------
# PyTorch pixel ops.  ``img`` is a uint8 tensor [3, H, W]; ``g`` a torch.Generator.


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _coin(g: torch.Generator, p: float) -> bool:
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    return torch.rand((), generator=g).item() < p


def random_resized_crop_box(height: int, width: int, scale, ratio, g: torch.Generator):
    """Crop box (top, left, h, w): area fraction ~ U(scale), aspect ratio log-uniform in ``ratio``,
    10 attempts, then the largest centred crop with a clamped aspect ratio (the torchvision and
    DALI ``random_resized_crop`` algorithm)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _interp():
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC


def resized_crop(img: torch.Tensor, box, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = box
    return TF.resized_crop(img, top, left, h, w, [size, size], interpolation=_interp(), antialias=True)


def resize_shorter(img: torch.Tensor, shorter: int) -> torch.Tensor:
    """Shorter side to ``shorter``, longer side rounded to nearest (as DALI's ``resize_shorter``;
    torchvision would truncate it)."""
    from torchvision.transforms.v2 import functional as TF

    h, w = img.shape[-2:]
    if h <= w:
        size = [shorter, max(1, int(math.floor(w * shorter / h + 0.5)))]
    else:
        size = [max(1, int(math.floor(h * shorter / w + 0.5))), shorter]
    return TF.resize(img, size, interpolation=_interp(), antialias=True)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop with the offset rounded half up (DALI's ``crop_pos = 0.5``)."""
    h, w = img.shape[-2:]
    top = int(math.floor((h - size) / 2 + 0.5))
    left = int(math.floor((w - size) / 2 + 0.5))
    return img[..., top : top + size, left : left + size]


_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def color_twist_matrix(brightness: float, contrast: float, saturation: float, hue_degrees: float):
    """The affine map (3x3 matrix, offset on the 0..255 scale) of DALI's ``color_twist``."""
    theta = -math.radians(hue_degrees)
    c, s = math.cos(theta), math.sin(theta)
    hue_sat = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, saturation * c, -saturation * s], [0.0, saturation * s, saturation * c]],
        dtype=torch.float64,
    )
    matrix = brightness * contrast * (_YIQ_TO_RGB @ hue_sat @ _RGB_TO_YIQ)
    offset = brightness * 128.0 * (1.0 - contrast)
    return matrix.float(), float(offset)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def color_twist(img: torch.Tensor, brightness=1.0, contrast=1.0, saturation=1.0, hue_degrees=0.0):
    matrix, offset = color_twist_matrix(brightness, contrast, saturation, hue_degrees)
    flat = img.reshape(3, -1).float()
    out = matrix @ flat + offset
    return _to_uint8(out).reshape(img.shape)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a uint8 [3, H, W] image: window ``2 * ceil(3 * sigma) + 1``,
    reflect-101 borders, rounded back to uint8 (two 1-D passes: k instead of k*k MACs per pixel)."""
    radius = math.ceil(3.0 * sigma)
    if radius == 0:
        return img
    h, w = img.shape[-2:]
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    x = img.float().unsqueeze(0)
    # Reflect padding needs pad < size; for tiny images fall back to repeated reflection.
    pad_h, pad_w = min(radius, h - 1), min(radius, w - 1)
    if pad_h < radius or pad_w < radius:
        idx_h = _reflect101_index(h, radius)
        idx_w = _reflect101_index(w, radius)
        x = x[:, :, idx_h][:, :, :, idx_w]
    else:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    # Sums of shifted slices: CPU depthwise conv2d is several times slower for these small windows.
    weights = kernel.tolist()
    rows = weights[0] * x[:, :, 0:h]
    for k in range(1, len(weights)):
        rows.add_(x[:, :, k : k + h], alpha=weights[k])
    out = weights[0] * rows[..., 0:w]
    for k in range(1, len(weights)):
        out.add_(rows[..., k : k + w], alpha=weights[k])
    return _to_uint8(out.squeeze(0))


def _reflect101_index(n: int, radius: int) -> torch.Tensor:
    idx = torch.arange(-radius, n + radius)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def solarize(img: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    return torch.where(img >= int(math.ceil(threshold)), 255 - img, img)


def normalize(img: torch.Tensor, flip: bool) -> torch.Tensor:
    x = img.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (x - mean) / std
    return x.flip(-1) if flip else x


def sample_jitter(jitter: Optional[ColorJitterSpec], g: torch.Generator):
    """(brightness, contrast, saturation, hue in degrees) for one crop, grayscale folded in."""
    if jitter is None:
        return 1.0, 1.0, 1.0, 0.0
    b = c = s = 1.0
    h = 0.0
    if _coin(g, jitter.prob):
        b = _uniform(g, 1 - jitter.brightness, 1 + jitter.brightness)
        c = _uniform(g, 1 - jitter.contrast, 1 + jitter.contrast)
        s = _uniform(g, 1 - jitter.saturation, 1 + jitter.saturation)
        h = _uniform(g, -jitter.hue, jitter.hue) * 360.0
    if _coin(g, jitter.grayscale_prob):
        s = 0.0
    return b, c, s, h


def apply_crop(img: torch.Tensor, spec: CropSpec, g: torch.Generator) -> torch.Tensor:
    """One multi-crop view: RRC, jitter + grayscale, blur, solarisation, flip, normalise."""
    box = random_resized_crop_box(img.shape[-2], img.shape[-1], spec.scale, ASPECT_RATIO, g)
    x = resized_crop(img, box, spec.size)
    b, c, s, h = sample_jitter(spec.jitter, g)
    if (b, c, s, h) != (1.0, 1.0, 1.0, 0.0):
        x = color_twist(x, b, c, s, h)
    if _coin(g, spec.blur_prob):
        x = gaussian_blur(x, _uniform(g, *BLUR_SIGMA))
    if _coin(g, spec.solarize_prob):
        x = solarize(x)
    return normalize(x, flip=_coin(g, spec.flip_prob))


def apply_supervised(img: torch.Tensor, spec: SupervisedSpec, g: torch.Generator) -> torch.Tensor:
    box = random_resized_crop_box(img.shape[-2], img.shape[-1], spec.scale, ASPECT_RATIO, g)
    x = resized_crop(img, box, spec.size)
    if spec.three_augment is not None:
        choice = int(torch.randint(0, 3, (), generator=g))
        if choice == 1:
            x = solarize(x)
        elif choice == 2:
            x = gaussian_blur(x, _uniform(g, *BLUR_SIGMA))
        j = spec.three_augment.jitter
        b = _uniform(g, 1 - j, 1 + j)
        c = _uniform(g, 1 - j, 1 + j)
        s = _uniform(g, 1 - j, 1 + j)
        if choice == 0:
            s = 0.0  # grayscale; jitter's saturation has nothing left to act on
        x = color_twist(x, b, c, s, 0.0)
    return normalize(x, flip=_coin(g, spec.flip_prob))


def apply_eval(img: torch.Tensor, spec: EvalSpec) -> torch.Tensor:
    x = center_crop(resize_shorter(img, spec.resize_shorter), spec.size)
    return normalize(x, flip=False)
