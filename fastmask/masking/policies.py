"""Mask policies: which patches of each image the student does not see.

A policy is a small dataclass (its options, checked on construction) that is called once per batch::

    policy = build_mask_policy("attmask_high")            # paper defaults
    mask = policy(B, (h, w), cls_attn=teacher_cls_attn, generator=g, device=x.device)  # [B, h*w] bool

``mask`` is True where a patch is hidden.  Ratios given as ``(low, high)`` are drawn per sample,
``r ~ U(low, high)``; the hidden count of a row is ``floor(r * h * w)`` (as ``fastmask.ops`` rounds).
Every policy can leave a row fully visible with probability ``1 - mask_prob`` (iBOT and AttMask mask
half of the images).  All randomness comes from ``generator`` (or torch's default generator), so a
step is reproducible from its generator's seed.  Policies call ``fastmask.ops``, never kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple, Type

import torch

from .. import ops
from ..philox import traced_generator
from .block import block_masks
from .ratios import (
    RatioSpec,
    check_fraction,
    check_range,
    check_ratio_per,
    counts_from_ratio,
    draw_ratio,
    generator_device,
    uniform,
)

HINT_COUNTS = ("tied", "independent")

__all__ = [
    "AttMaskPolicy",
    "HINT_COUNTS",
    "BlockMaskPolicy",
    "MaskPolicy",
    "NoMaskPolicy",
    "RandomMaskPolicy",
    "POLICIES",
    "build_mask_policy",
]


def _check_call(batch_size, grid_size, cls_attn) -> Tuple[int, int, int]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    if (
        not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid_size)
    ):
        raise ValueError(f"grid_size must be (h, w) with positive ints, got {grid_size!r}")
    h, w = grid_size
    if cls_attn is not None:
        if not isinstance(cls_attn, torch.Tensor):
            raise TypeError(f"cls_attn must be a tensor [B, h*w], got {type(cls_attn).__name__}")
        if tuple(cls_attn.shape) != (batch_size, h * w):
            raise ValueError(
                f"cls_attn must have shape [B, h*w] = [{batch_size}, {h * w}] for grid {tuple(grid_size)}, "
                f"got {tuple(cls_attn.shape)}"
            )
    return batch_size, h, w


def _resolve_device(device, cls_attn: Optional[torch.Tensor]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return cls_attn.device if cls_attn is not None else torch.device("cpu")


@dataclass
class MaskPolicy:
    """Base class: ``policy(batch_size, (h, w), *, cls_attn=None, generator=None, device=None)``
    returns a [B, h*w] bool mask (True = hidden) on ``device`` (default: cls_attn's, else CPU)."""

    name = "base"
    needs_cls_attn = False  # AttMask policies rank patches by the teacher's CLS attention

    def __call__(
        self,
        batch_size: int,
        grid_size: Tuple[int, int],
        *,
        cls_attn: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        device=None,
    ) -> torch.Tensor:
        B, h, w = _check_call(batch_size, grid_size, cls_attn)
        if self.needs_cls_attn and cls_attn is None:
            raise ValueError(
                f"mask policy {self.name!r} ranks patches by CLS attention: pass cls_attn [B, h*w] "
                "(e.g. the teacher's last-layer map from fastmask.ops.attention(..., return_cls_attn=True))"
            )
        device = _resolve_device(device, cls_attn)
        if cls_attn is not None and cls_attn.device != device:
            raise ValueError(f"cls_attn is on {cls_attn.device} but device={device} was asked for")
        return self.generate(B, (h, w), cls_attn=cls_attn, generator=generator, device=device)

    def generate(self, batch_size, grid_size, *, cls_attn, generator, device) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class NoMaskPolicy(MaskPolicy):
    """Every patch visible."""

    name = "none"

    def generate(self, batch_size, grid_size, *, cls_attn, generator, device):
        return torch.zeros(batch_size, grid_size[0] * grid_size[1], dtype=torch.bool, device=device)


@dataclass
class RandomMaskPolicy(MaskPolicy):
    """MAE-style uniform masking: ``floor(ratio * N)`` patches per row chosen uniformly at random
    (the top of uniform noise, through ``ops.cls_attention_mask``, so per-sample ratios and the
    row gate are fused into one kernel)."""

    ratio: RatioSpec = 0.75
    mask_prob: float = 1.0
    ratio_per: str = "sample"  # a (low, high) ratio drawn per image (iBOT's loader) or once per batch
    name = "random"

    def __post_init__(self):
        self.ratio = check_range("ratio", self.ratio)
        self.mask_prob = check_fraction("mask_prob", self.mask_prob, closed=True)
        self.ratio_per = check_ratio_per(self.ratio_per)

    def generate(self, batch_size, grid_size, *, cls_attn, generator, device):
        N = grid_size[0] * grid_size[1]
        # Ratios are always drawn first, so a policy's per-sample ratios can be replayed from its generator.
        ratio = draw_ratio(self.ratio, batch_size, generator, device, self.ratio_per)
        noise = uniform((batch_size, N), generator, device)
        return ops.cls_attention_mask(noise, ratio, mode="high", mask_prob=self.mask_prob, generator=generator)


@dataclass
class BlockMaskPolicy(MaskPolicy):
    """BEiT block-wise masking: rectangles of at least ``min_num_patches`` patches with aspect ratio
    in ``aspect_ratio``, exactly ``floor(ratio * N)`` hidden patches per masked row."""

    ratio: RatioSpec = 0.4
    mask_prob: float = 1.0
    min_num_patches: int = 16
    max_num_patches: Optional[int] = None
    aspect_ratio: Tuple[float, float] = (0.3, 1 / 0.3)
    ratio_per: str = "sample"  # iBOT's ImageFolderMask draws a ratio per image and crop
    name = "block"

    def __post_init__(self):
        self.ratio = check_range("ratio", self.ratio)
        self.mask_prob = check_fraction("mask_prob", self.mask_prob, closed=True)
        self.ratio_per = check_ratio_per(self.ratio_per)
        if isinstance(self.min_num_patches, bool) or not isinstance(self.min_num_patches, int) or self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be a positive int, got {self.min_num_patches!r}")
        if self.max_num_patches is not None and (
            not isinstance(self.max_num_patches, int) or self.max_num_patches < self.min_num_patches
        ):
            raise ValueError(f"max_num_patches must be None or an int >= min_num_patches, got {self.max_num_patches!r}")
        lo, hi = self.aspect_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"aspect_ratio must be (low, high) with 0 < low <= high, got {self.aspect_ratio!r}")
        self.aspect_ratio = (float(lo), float(hi))

    def generate(self, batch_size, grid_size, *, cls_attn, generator, device):
        N = grid_size[0] * grid_size[1]
        # Built where the random numbers live (the generator's device), then moved once.
        build_on = generator_device(generator, device)
        ratio = draw_ratio(self.ratio, batch_size, generator, build_on, self.ratio_per)
        counts = counts_from_ratio(ratio, N, batch_size, build_on)
        if self.mask_prob < 1.0:
            gate = torch.rand(batch_size, generator=traced_generator(generator), device=build_on) < self.mask_prob
            counts = torch.where(gate, counts, 0)
        # The largest count any row can get, known on the host: block_masks then never reads counts back.
        top = self.ratio[1] if isinstance(self.ratio, tuple) else self.ratio
        mask = block_masks(
            counts, grid_size, min_num_patches=self.min_num_patches, max_num_patches=self.max_num_patches,
            aspect_ratio=self.aspect_ratio, generator=generator, max_count=int(top * N),
        )
        return mask.to(device)


@dataclass
class AttMaskPolicy(MaskPolicy):
    """AttMask ("What to Hide from Your Students", Kakogeorgiou et al., ECCV 2022).

    ``high`` hides the most attended patches, ``low`` the least attended, ``hint`` hides like
    ``high`` then reveals some patches drawn among the ``show_max`` most attended.  Defaults are the
    official code's (gkakogeorgiou/attmask, main_attmask.py ``train_one_epoch`` and attmask.py
    ``AttMask``): mask_prob 0.5, ratio ~ U(0.1, 0.5) drawn once per batch (``ratio_per="batch"``: one
    ``get_pred_ratio()`` per iteration, shared by every image and both global views when the method
    masks its global views in one call), show_max 0.1, and a hint count tied to the mask ratio
    (``hint_count="tied"``: ``int(show_max * ratio * N)`` revealed tokens).

    fastmask's variants: ``ratio_per="sample"`` draws a ratio per image, ``hint_count="independent"``
    reveals ``int(show_ratio * N)`` tokens with ``show_ratio ~ U(0.01, 0.05)`` drawn per image.
    """

    mode: str = "high"
    ratio: RatioSpec = (0.1, 0.5)
    mask_prob: float = 0.5
    show_max: float = 0.1
    show_ratio: Optional[RatioSpec] = (0.01, 0.05)  # hint_count="independent" only
    ratio_per: str = "batch"
    hint_count: str = "tied"
    name = "attmask"
    needs_cls_attn = True

    def __post_init__(self):
        if self.mode not in ops.MASK_MODES:
            raise ValueError(f"mode must be one of {ops.MASK_MODES}, got {self.mode!r}")
        self.name = f"attmask_{self.mode}"
        self.ratio = check_range("ratio", self.ratio)
        self.mask_prob = check_fraction("mask_prob", self.mask_prob, closed=True)
        self.show_max = check_fraction("show_max", self.show_max, closed=True)
        self.ratio_per = check_ratio_per(self.ratio_per)
        if self.hint_count not in HINT_COUNTS:
            raise ValueError(f"hint_count must be one of {HINT_COUNTS}, got {self.hint_count!r}")
        if self.mode == "hint" and self.hint_count == "independent":
            if self.show_ratio is None:
                raise ValueError("attmask_hint with hint_count='independent' needs show_ratio "
                                 "(a float or a (low, high) range, e.g. (0.01, 0.05))")
            self.show_ratio = check_range("show_ratio", self.show_ratio, closed=True)
            top = self.show_ratio[1] if isinstance(self.show_ratio, tuple) else self.show_ratio
            if top > self.show_max:
                raise ValueError(f"show_ratio ({self.show_ratio}) must not exceed show_max ({self.show_max})")

    def generate(self, batch_size, grid_size, *, cls_attn, generator, device):
        ratio = draw_ratio(self.ratio, batch_size, generator, device, self.ratio_per)
        show_ratio = None
        if self.mode == "hint":
            if self.hint_count == "tied":
                # attmask.py show_hints: int(show_ratio * N) with show_ratio = show_max * pred_ratio
                show_ratio = ratio * self.show_max
            else:
                show_ratio = draw_ratio(self.show_ratio, batch_size, generator, device)
        return ops.cls_attention_mask(
            cls_attn, ratio, mode=self.mode, mask_prob=self.mask_prob, show_max=self.show_max,
            show_ratio=show_ratio, generator=generator,
        )


POLICIES: Dict[str, Tuple[Type[MaskPolicy], dict]] = {
    "none": (NoMaskPolicy, {}),
    "random": (RandomMaskPolicy, {}),
    "block": (BlockMaskPolicy, {}),
    "attmask_high": (AttMaskPolicy, {"mode": "high"}),
    "attmask_low": (AttMaskPolicy, {"mode": "low"}),
    "attmask_hint": (AttMaskPolicy, {"mode": "hint"}),
}


def build_mask_policy(name: str, **kwargs) -> MaskPolicy:
    """The policy ``name`` (one of ``POLICIES``) with its options; unknown options raise TypeError.

    ``none`` ignores every option (a method may pass its masking options unconditionally).
    """
    if name not in POLICIES:
        raise ValueError(f"mask policy must be one of {tuple(POLICIES)}, got {name!r}")
    cls, fixed = POLICIES[name]
    if cls is NoMaskPolicy:
        return NoMaskPolicy()
    allowed = {f.name for f in fields(cls)} - set(fixed)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"mask policy {name!r} does not take {unknown}; its options are {sorted(allowed)}")
    return cls(**fixed, **kwargs)
