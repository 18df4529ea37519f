"""MaskedKD keep-set: the tokens the teacher runs on.

MaskedKD (Son et al., "The Role of Masking for Efficient Supervised Knowledge Distillation of Vision
Transformers") ranks the patches by the student's last-layer CLS attention (head mean) and feeds the
teacher only the ``keep`` most attended ones, plus the prefix tokens: CLS is never dropped.
"""
from __future__ import annotations

import torch

from .. import ops

__all__ = ["maskedkd_keep_ids", "maskedkd_patch_ids"]


def _check_prefix(num_prefix_tokens) -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    return num_prefix_tokens


def maskedkd_patch_ids(cls_attn: torch.Tensor, keep: int) -> torch.Tensor:
    """Patch indices [B, keep] (0-based over the patches, ascending) of the ``keep`` most attended
    patches of each row of ``cls_attn`` [B, N]; ties go to the lower index."""
    return ops.topk_tokens(cls_attn, keep, largest=True)


def maskedkd_keep_ids(cls_attn: torch.Tensor, keep: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Indices [B, num_prefix_tokens + keep] into the FULL token sequence (prefix tokens, then patches)
    that the teacher keeps: ``0 .. p-1`` first, then the top-``keep`` patches offset by ``p``,
    ascending.  Use with ``fastmask.ops.gather_tokens(tokens, ids)`` on the [B, p + N, D] sequence.
    """
    p = _check_prefix(num_prefix_tokens)
    patch_ids = maskedkd_patch_ids(cls_attn, keep)
    prefix = torch.arange(p, dtype=torch.int64, device=patch_ids.device).expand(patch_ids.shape[0], p)
    return torch.cat([prefix, patch_ids + p], dim=1)
