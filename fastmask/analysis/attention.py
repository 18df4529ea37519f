"""Attention statistics of one layer, as pure functions of its attention matrix.

Every function takes ``attn`` [B, H, L, L] (rows are softmax distributions over the L keys,
prefix tokens such as CLS first) and returns one number per head, averaged over the images and
queries of the batch, as a float64 tensor [H].  The caller computes ``attn`` in float32 from the
layer's q and k (never the fused kernel, which does not materialise it).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

__all__ = [
    "patch_distance_matrix",
    "attention_distance",
    "attention_entropy",
    "attention_nmi",
]

# Probabilities are clamped here before the log: 0 * log 0 is taken as 0.
_TINY = 1e-30


def _check_attn(attn: torch.Tensor) -> None:
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a tensor [B, H, L, L], got {type(attn).__name__}")
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must have shape [B, H, L, L], got {tuple(attn.shape)}")
    if not attn.is_floating_point():
        raise TypeError(f"attn must be a floating tensor, got {attn.dtype}")


def _grid(grid_size) -> Tuple[int, int]:
    if isinstance(grid_size, int):
        return grid_size, grid_size
    gh, gw = grid_size
    return int(gh), int(gw)


def patch_distance_matrix(grid_size, patch_size: int, device=None) -> torch.Tensor:
    """Euclidean distances in pixels between patch centres on a row-major grid: [N, N] float64."""
    gh, gw = _grid(grid_size)
    rows = torch.arange(gh, device=device, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, device=device, dtype=torch.float64).repeat(gh)
    coords = torch.stack([rows, cols], dim=-1)  # [N, 2] in patch units
    return torch.cdist(coords, coords) * float(patch_size)


def attention_distance(
    attn: torch.Tensor, grid_size, patch_size: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Average attention distance per head, in pixels: [H].

    Prefix tokens have no position, so they are dropped both as queries and as keys; each patch
    query's attention over the patch keys is renormalised to sum to one, and the distance is the
    attention-weighted mean of the key-to-query pixel distances, averaged over queries and images.
    """
    _check_attn(attn)
    gh, gw = _grid(grid_size)
    n = gh * gw
    if attn.shape[-1] != n + num_prefix_tokens:
        raise ValueError(
            f"attn has L={attn.shape[-1]} tokens, expected num_prefix_tokens + grid = {num_prefix_tokens} + {n}"
        )
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:].double()
    a = a / a.sum(-1, keepdim=True).clamp_min(_TINY)
    dist = patch_distance_matrix((gh, gw), patch_size, device=attn.device)
    per_query = (a * dist).sum(-1)  # [B, H, N]
    return per_query.mean(dim=(0, 2))


def _row_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(_TINY).log()).sum(-1)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the attention rows per head: [H].  Uniform rows give log L."""
    _check_attn(attn)
    return _row_entropy(attn.double()).mean(dim=(0, 2))


def attention_nmi(attn: torch.Tensor) -> torch.Tensor:
    """Normalised mutual information between queries and keys per head: [H].

    With a uniform prior over the L queries, p(k|q) is the attention row and p(k) the mean row,
    so I(q, k) = H(k) - mean_q H(k|q) and NMI = I / sqrt(H(q) H(k)) with H(q) = log L.  It is 0 when
    every query attends alike (uniform or not) and 1 when each query attends to its own key.
    Computed per image, then averaged over images; a degenerate image with H(k) = 0 counts as 0.
    """
    _check_attn(attn)
    a = attn.double()
    length = a.shape[-1]
    h_cond = _row_entropy(a).mean(-1)  # [B, H]
    h_key = _row_entropy(a.mean(-2))  # [B, H]
    h_query = math.log(length)
    mutual = (h_key - h_cond).clamp_min(0.0)
    denom = (h_key * h_query).sqrt()
    nmi = torch.where(denom > 0, mutual / denom.clamp_min(_TINY), torch.zeros_like(mutual))
    return nmi.mean(0)
