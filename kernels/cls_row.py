"""The CLS attention row alone, in one launch: ``mean_h softmax(q0 K^T * scale)[patch keys]``, float32.

``cls_row(q, k, scale, num_prefix_tokens)`` -> ``cls_attn`` [B, L - num_prefix_tokens] float32, equal to
``reference.attention``'s map.  It needs only query 0 of each head, so it is 1/L of the score work of
the attention, and it runs beside any attention kernel: with it, the fastest SDPA backend of a device
(cuDNN, flash, memory-efficient) exports the map too, at the cost of reading K once more.

``cls_row`` is the Triton implementation of the operator ``fastmask::cls_row`` (registered in
``fastmask/library.py``); the launch goes through ``wrap_triton`` so ``torch.compile`` sees it.

One program per sample ``b`` holds all heads at once: a [BLOCK_H, BLOCK_N, BLOCK_D] tile of K and the
[BLOCK_H, BLOCK_D] CLS queries.  Pass 1 streams the keys for every head's row maximum and normaliser
(online, float32, base 2); pass 2 streams the patch keys again (from L2: one sample's K is at most a
few hundred KB), forms the normalised probabilities and sums them over heads in registers, so the
head mean is written once, without atomics (bit-reproducible).  The products are on the CUDA cores:
one row per head is a matrix-vector product, memory-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import next_power_of_2

LOG2E = 1.4426950408889634
_TILE_ELEMS = 8192  # K elements per [BLOCK_H, BLOCK_N, BLOCK_D] tile: ~64 float32 registers per thread at 4 warps


@triton.jit
def _head_scores(k_base, q0, offs_h, keys, offs_d, H, L, HEAD_DIM, stride_kh, stride_kl, stride_kd, qk_scale):
    """s[h, j] = q0[h] . k[h, keys[j]] * scale * log2(e); -inf outside the valid heads/keys."""
    valid = (offs_h < H)[:, None] & (keys < L)[None, :]
    ptrs = (k_base + offs_h[:, None, None] * stride_kh + keys[None, :, None] * stride_kl
            + offs_d[None, None, :] * stride_kd)
    k = tl.load(ptrs, mask=valid[:, :, None] & (offs_d < HEAD_DIM)[None, None, :], other=0.0).to(tl.float32)
    s = tl.sum(k * q0[:, None, :], 2) * qk_scale
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _cls_row_kernel(
    Q, K, Out,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    H, L, HEAD_DIM, NUM_PREFIX, qk_scale, inv_heads,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q0 = tl.load(Q + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                 mask=(offs_h < H)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    k_base = K + b * stride_kb

    # Pass 1: each head's row maximum and normaliser over all L keys (prefix keys included).
    # Padded heads see only -inf scores: their maximum is held at 0 so that no NaN appears.
    m = tl.zeros([BLOCK_H], dtype=tl.float32) - 1.0e30
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        s = _head_scores(k_base, q0, offs_h, start_n + offs_n, offs_d, H, L, HEAD_DIM,
                         stride_kh, stride_kl, stride_kd, qk_scale)
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    inv_l = tl.where(offs_h < H, 1.0 / tl.where(offs_h < H, l, 1.0), 0.0) * inv_heads

    # Pass 2: normalised probabilities of the patch keys, summed over heads in registers.
    num_patches = L - NUM_PREFIX
    out_base = Out + b * num_patches
    for start_n in range(NUM_PREFIX, L, BLOCK_N):
        keys = start_n + offs_n
        s = _head_scores(k_base, q0, offs_h, keys, offs_d, H, L, HEAD_DIM, stride_kh, stride_kl, stride_kd, qk_scale)
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        tl.store(out_base + keys - NUM_PREFIX, tl.sum(p, 0), mask=keys < L)


def _blocks(H: int, Dh: int):
    block_h = next_power_of_2(H)
    block_d = next_power_of_2(Dh)
    block_n = max(16, min(128, next_power_of_2(_TILE_ELEMS // (block_h * block_d))))
    return block_h, block_n, block_d


def cls_row(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[B, L - num_prefix_tokens] float32: the head-mean softmax row of query 0 over the patch keys.

    q, k [B, H, L, Dh] (any strides, any float dtype; only q[:, :, 0] is read).  No gradient: the map
    is an export (AttMask, MaskedKD), as in ``fastmask.ops.attention``.
    """
    B, H, L, Dh = k.shape
    out = torch.empty(B, L - num_prefix_tokens, dtype=torch.float32, device=k.device)
    if out.numel() == 0:
        return out
    if H == 0 or Dh == 0:
        return out.fill_(1.0 / L)  # no scores: every key equally likely
    block_h, block_n, block_d = _blocks(H, Dh)
    wrap_triton(_cls_row_kernel)[(B,)](
        q, k, out,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        H, L, Dh, num_prefix_tokens, float(scale) * LOG2E, 1.0 / H,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return out
