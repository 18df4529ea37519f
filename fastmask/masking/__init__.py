"""Mask policies the training methods call (built on ``fastmask.ops``, never on kernels directly).

* ``build_mask_policy(name, **options)``: ``none``, ``random`` (MAE), ``block`` (BEiT),
  ``attmask_high`` / ``attmask_low`` / ``attmask_hint`` (AttMask, paper defaults); a policy is
  called as ``policy(B, (h, w), cls_attn=..., generator=..., device=...) -> [B, h*w] bool``
  (True = hidden).
* ``sample_ratios(B, low, high)``: per-sample ratios ``r ~ U(low, high)`` on the device.
* ``maskedkd_keep_ids(cls_attn, keep)``: the tokens MaskedKD's teacher runs on (CLS always kept).
"""
from .block import block_masks
from .keep import maskedkd_keep_ids, maskedkd_patch_ids
from .policies import (
    POLICIES,
    AttMaskPolicy,
    BlockMaskPolicy,
    MaskPolicy,
    NoMaskPolicy,
    RandomMaskPolicy,
    build_mask_policy,
)
from .ratios import sample_ratios

__all__ = [
    "AttMaskPolicy",
    "BlockMaskPolicy",
    "MaskPolicy",
    "NoMaskPolicy",
    "POLICIES",
    "RandomMaskPolicy",
    "block_masks",
    "build_mask_policy",
    "maskedkd_keep_ids",
    "maskedkd_patch_ids",
    "sample_ratios",
]
