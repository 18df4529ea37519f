"""Softmax attention that also exports the CLS attention map: Triton forward and backward.

``attention_forward`` / ``attention_backward`` (the Triton implementations of the operators
``fastmask::attention`` / ``attention_backward``, registered in ``fastmask/library.py``) compute
``softmax(q k^T * scale) v`` for q, k, v [B, H, L, Dh] with a FlashAttention-2 style online softmax:
one program per (query block, batch*head) streams the key/value blocks through registers and never
builds the [B, H, L, L] score matrix.  With ``return_cls_attn`` it also returns
``cls_attn`` [B, L - num_prefix_tokens] float32: the softmax row of query 0 over the keys
``num_prefix_tokens .. L-1``, averaged over heads (what AttMask and MaskedKD need).

How the CLS row is exported cheaply: only the program owning query block 0 does extra work.  When its
main loop ends it holds the final row maximum ``m0`` and normaliser ``l0`` of row 0, so one more pass
over the keys for that single row (a [BLOCK_N, Dh] multiply-and-sum on the CUDA cores, reading K that
the program has just streamed, so it comes from L2) yields the normalised probabilities
``exp(s0j - m0) / l0``.  They go to a per-head float32 buffer [B, H, L-p]; the head mean is a small
deterministic reduction afterwards (no atomics, so the result is bit-reproducible).  The branch is a
``constexpr``: with the export off the kernel is compiled without it and pays nothing.

Numerics: scores, the softmax statistics and every accumulator are float32; ``tl.dot`` takes its
inputs in the input dtype (fp16/bf16 tensor cores, the probabilities rounded to that dtype before the
P@V product, as in FlashAttention).  For float32 inputs the dots use TF32 exactly when PyTorch's
``torch.backends.cuda.matmul.allow_tf32`` allows it for matmuls (off by default), else full IEEE
fp32; the CPU interpreter always computes in exact fp32.  The log-sum-exp of every row (base 2) is
saved for the backward.

Backward (FlashAttention-2): a preprocess kernel computes ``delta = rowsum(dO * O)``; a key-block
kernel recomputes P from the saved log-sum-exp and accumulates dK, dV over all query blocks; a separate
query-block kernel accumulates dQ over all key blocks (no atomics: every gradient row has exactly one
owner program, so the backward is deterministic too).

Layout: q, k, v may be arbitrary strided views (timm's ``qkv.reshape(B, N, 3, H, Dh).permute(...)``
views are read in place, never copied).  ``out`` is returned as [B, H, L, Dh] whose memory is laid out
as [B, L, H, Dh], so timm's ``out.transpose(1, 2).reshape(B, L, H * Dh)`` that follows is a free view.

Head dims need not be powers of two (48, 80, ...): the Dh axis is padded to the next power of two
in registers and masked.  Block sizes are autotuned on a GPU (key: L, Dh, dtype) and fixed small under
the CPU interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import cdiv, next_power_of_2

LOG2E = 1.4426950408889634

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Fixed blocks for the CPU interpreter: twice the tail tile (16), so the tests' awkward lengths cross
# several full blocks and then one or two tail tiles.
_INTERPRET_BLOCK = 32


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """``tl.dot`` in the input dtype with a float32 accumulator.

    UPCAST_BF16 is only set under the CPU interpreter for bfloat16 inputs: Triton 3.9's interpreter
    stores bfloat16 as uint16 and multiplies the raw integers in ``tl.dot``.  Upcasting first gives
    what the tensor cores compute (exact bf16 products, float32 sums).
    """
    if UPCAST_BF16:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _program_tile(L, H, BLOCK: tl.constexpr):
    """(block index along L, batch*head, b, h) of this program in a 1-D grid of cdiv(L, BLOCK) blocks
    per head: the blocks of one head are adjacent, so programs running together share its K/V in L2."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(L, BLOCK)
    pid_l = pid % num_blocks
    bh = pid // num_blocks
    return pid_l, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _head_rows(pid_l, L, HEAD_DIM, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``pid_l * BLOCK ...`` of one head and its (padded) head dim, with their bounds masks:
    ``(offs, offs_d, mask, mask_d, mask_2d)``."""
    offs = pid_l * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs < L
    mask_d = offs_d < HEAD_DIM
    return offs, offs_d, mask, mask_d, mask[:, None] & mask_d[None, :]


@triton.jit
def _row_ptrs(base, rows, offs_d, stride_l, stride_d):
    """Pointers to the [rows, Dh] tile of one head's [L, Dh] matrix at ``base``."""
    return base + rows[:, None] * stride_l + offs_d[None, :] * stride_d


@triton.jit
def _load_rows(base, rows, offs_d, stride_l, stride_d, mask):
    """The [rows, Dh] tile of one head's [L, Dh] matrix at ``base``; masked-out entries read 0."""
    return tl.load(_row_ptrs(base, rows, offs_d, stride_l, stride_d), mask=mask, other=0.0)


@triton.jit
def _fwd_key_block(
    acc, m_i, l_i, q, k_base, v_base, offs_n, offs_d, L, mask_d, stride_kl, stride_kd, stride_vl, stride_vd,
    qk_scale, MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    """One step of the online softmax over the keys ``offs_n`` (a full block, or a small tail tile)."""
    k_ptrs = _row_ptrs(k_base, offs_n, offs_d, stride_kl, stride_kd)
    v_ptrs = _row_ptrs(v_base, offs_n, offs_d, stride_vl, stride_vd)
    if MASK_KEYS:
        mask_n = offs_n < L
        k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    # Scores in the log2 domain: exp2 is the native instruction, scale*log2(e) folds into one multiply.
    s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST_BF16) * qk_scale
    if MASK_KEYS:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # Every key block holds at least one valid key, so m_new is finite and no NaN can appear.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_BF16)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, ClsHead,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    H, L, HEAD_DIM, NUM_PREFIX, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_N: tl.constexpr,
    EXPORT_CLS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    pid_m, bh, b, h = _program_tile(L, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L
    mask_d = offs_d < HEAD_DIM

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    q = _load_rows(q_base, offs_m, offs_d, stride_ql, stride_qd, mask_m[:, None] & mask_d[None, :])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full key blocks need no bounds masks.  The ragged tail (L not a multiple of BLOCK_N) goes in
    # TAIL_N-key tiles (16: the K step of the P@V MMA), so at L = 197 and BLOCK_N = 64 the last five
    # keys cost a 16-key tile instead of a 64-key one (fewer padded scores: 208 keys, not 256).
    full_n = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_n, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, start_n + offs_n, offs_d, L, mask_d,
                                       stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, False,
                                       DOT_PRECISION, UPCAST_BF16)
    offs_tail = tl.arange(0, TAIL_N)
    for start_n in range(full_n, L, TAIL_N):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, start_n + offs_tail, offs_d, L, mask_d,
                                       stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, True,
                                       DOT_PRECISION, UPCAST_BF16)

    out = acc / l_i[:, None]
    o_base = Out + b * stride_ob + h * stride_oh
    tl.store(_row_ptrs(o_base, offs_m, offs_d, stride_ol, stride_od), out.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    # Padded query rows (offs_m >= L) saw only finite scores of zero, so l_i > 0 and log2 is safe.
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_i), mask=mask_m)

    if EXPORT_CLS:
        if pid_m == 0:
            # Row 0's final statistics, pulled out of the block's vectors.
            m0 = tl.max(tl.where(offs_m == 0, m_i, float("-inf")), 0)
            inv_l0 = 1.0 / tl.sum(tl.where(offs_m == 0, l_i, 0.0), 0)
            q0 = tl.load(q_base + offs_d * stride_qd, mask=mask_d, other=0.0).to(tl.float32)
            num_patches = L - NUM_PREFIX
            cls_base = ClsHead + bh.to(tl.int64) * num_patches
            # One pass over the patch keys for the single CLS row; the prefix keys are skipped.
            for start_n in range(NUM_PREFIX, L, BLOCK_N):
                keys = start_n + offs_n
                mask_n = keys < L
                k = _load_rows(k_base, keys, offs_d, stride_kl, stride_kd, mask_n[:, None] & mask_d[None, :])
                k = k.to(tl.float32)
                s0 = tl.sum(k * q0[None, :], 1) * qk_scale
                tl.store(cls_base + keys - NUM_PREFIX, tl.exp2(s0 - m0) * inv_l0, mask=mask_n)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    H, L, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d]  (= rowsum(P * dP), the softmax backward's shift)."""
    pid_m, bh, b, h = _program_tile(L, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = _load_rows(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ol, stride_od, mask).to(tl.float32)
    do = _load_rows(DOut + b * stride_gb + h * stride_gh, offs_m, offs_d, stride_gl, stride_gd, mask).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, offs_m, offs_d, mask_n, mask_d, L,
                      stride_ql, stride_qd, stride_gl, stride_gd, qk_scale,
                      DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q (unscaled) over the queries ``offs_m``."""
    mask_m = offs_m < L
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = _load_rows(q_base, offs_m, offs_d, stride_ql, stride_qd, mask_md)
    do = _load_rows(do_base, offs_m, offs_d, stride_gl, stride_gd, mask_md)
    lse = tl.load(Lse + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    s_t = _mma(k, tl.trans(q), DOT_PRECISION, UPCAST_BF16) * qk_scale
    p_t = tl.exp2(s_t - lse[None, :])
    p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
    dv += _mma(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST_BF16)
    dp_t = _mma(v, tl.trans(do), DOT_PRECISION, UPCAST_BF16)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _mma(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST_BF16)
    return dk, dv


@triton.jit
def _dq_key_block(dq, q, do, lse, delta, k_base, v_base, offs_n, offs_d, mask_m, mask_d, L,
                  stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
                  DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """dQ += dS K (unscaled) over the keys ``offs_n``."""
    mask_n = offs_n < L
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = _load_rows(k_base, offs_n, offs_d, stride_kl, stride_kd, mask_nd)
    v = _load_rows(v_base, offs_n, offs_d, stride_vl, stride_vd, mask_nd)
    s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST_BF16) * qk_scale
    p = tl.exp2(s - lse[:, None])
    p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
    dp = _mma(do, tl.trans(v), DOT_PRECISION, UPCAST_BF16)
    ds = p * (dp - delta[:, None])
    dq += _mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_BF16)
    return dq


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    H, L, HEAD_DIM, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    """One program per (key block, batch*head): dV = P^T dO and dK = scale * dS^T Q over all queries.

    Works on the transposed tiles (keys x queries) so that no tile needs a transpose before its dot.
    DK and DV share one (contiguous) layout, hence one set of strides.
    """
    pid_n, bh, b, h = _program_tile(L, H, BLOCK_N)
    offs_n, offs_d, mask_n, mask_d, mask_nd = _head_rows(pid_n, L, HEAD_DIM, BLOCK_N, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)

    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kl, stride_kd, mask_nd)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vl, stride_vd, mask_nd)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + b * stride_gb + h * stride_gh
    row_base = bh.to(tl.int64) * L

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Full query blocks, then the ragged tail in TAIL_M-query tiles (the K step of the dV/dK MMAs).
    full_m = (L // BLOCK_M) * BLOCK_M
    for start_m in range(0, full_m, BLOCK_M):
        dk, dv = _dkdv_query_block(dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, start_m + offs_m0, offs_d,
                                   mask_n, mask_d, L, stride_ql, stride_qd, stride_gl, stride_gd, qk_scale,
                                   DOT_PRECISION, UPCAST_BF16)
    offs_tail = tl.arange(0, TAIL_M)
    for start_m in range(full_m, L, TAIL_M):
        dk, dv = _dkdv_query_block(dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, start_m + offs_tail, offs_d,
                                   mask_n, mask_d, L, stride_ql, stride_qd, stride_gl, stride_gd, qk_scale,
                                   DOT_PRECISION, UPCAST_BF16)

    dk *= scale
    dst = offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd
    tl.store(DK + b * stride_dkb + h * stride_dkh + dst, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * stride_dkb + h * stride_dkh + dst, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    H, L, HEAD_DIM, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
):
    """One program per (query block, batch*head): dQ = scale * dS K over all keys."""
    pid_m, bh, b, h = _program_tile(L, H, BLOCK_M)
    offs_m, offs_d, mask_m, mask_d, mask_md = _head_rows(pid_m, L, HEAD_DIM, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)

    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, stride_qd, mask_md)
    do = _load_rows(DOut + b * stride_gb + h * stride_gh, offs_m, offs_d, stride_gl, stride_gd, mask_md)
    row_base = bh.to(tl.int64) * L
    lse = tl.load(Lse + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_n = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_n, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse, delta, k_base, v_base, start_n + offs_n0, offs_d, mask_m, mask_d, L,
                           stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, DOT_PRECISION, UPCAST_BF16)
    offs_tail = tl.arange(0, TAIL_N)
    for start_n in range(full_n, L, TAIL_N):
        dq = _dq_key_block(dq, q, do, lse, delta, k_base, v_base, start_n + offs_tail, offs_d, mask_m, mask_d, L,
                           stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, DOT_PRECISION, UPCAST_BF16)

    dq *= scale
    tl.store(_row_ptrs(DQ + b * stride_dqb + h * stride_dqh, offs_m, offs_d, stride_dql, stride_dqd),
             dq.to(DQ.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------------
# block-size selection: autotuned on a GPU, fixed under the interpreter
# ---------------------------------------------------------------------------------------------

# Autotune configs per kind of matrix unit and head-dim tile (``_config_class``), each checked for
# sm_90 by tests/test_attention_sm90.py (via tests/compile_for_gpu.py --report): no spills, and
# wgmma on every 16-bit and TF32 config.  wgmma's M is 64 rows per warpgroup of 4 warps, so the M side
# of every dot (forward / dQ: BLOCK_M queries; dK/dV: BLOCK_N keys) is >= 64: the BLOCK_M=32 and
# BLOCK_N=32 configs of the first version fell back to mma.sync.  The 32x128 backward configs, which
# spilled, are gone, and a 128-wide head-dim tile (Dh 80...128) gets its own smaller set.  The other
# side of each tile only sets the N/K extent (multiples of 16), which the tail tiles shrink at ragged
# lengths.  Entries: (BLOCK_M, BLOCK_N, num_warps, num_stages).
_MMA16_FWD = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 4), (128, 64, 8, 3), (128, 32, 8, 3),
              (128, 64, 8, 2)]
_MMA16_DQ = [(64, 64, 4, 2), (64, 32, 4, 2), (64, 16, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2)]
_CONFIGS = {
    "fwd": {
        ("mma16", 64): _MMA16_FWD, ("mma16", 128): _MMA16_FWD,
        ("tf32", 64): [(64, 32, 4, 2), (64, 16, 4, 3), (128, 32, 8, 2), (64, 64, 4, 2)],
        ("tf32", 128): [(64, 16, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2), (64, 16, 8, 2)],
        # float32 without TF32: FMA dots, no tensor cores; small tiles keep the products in registers.
        ("ieee", 64): [(32, 32, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2), (64, 16, 8, 2)],
        ("ieee", 128): [(16, 16, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1)],
    },
    "dkdv": {
        ("mma16", 64): [(32, 64, 4, 2), (16, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2),
                        (64, 128, 8, 2)],
        ("mma16", 128): [(16, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2)],
        ("tf32", 64): [(16, 64, 4, 2), (32, 64, 4, 2), (16, 128, 8, 2)],
        # (no TF32 dK/dV tile at a 128-wide head dim avoids spilling: those run as "ieee", see _dkdv_precision)
        ("ieee", 64): [(16, 32, 4, 2), (16, 64, 8, 2)],
        ("ieee", 128): [(16, 16, 4, 1), (16, 32, 8, 1), (16, 16, 8, 1)],
    },
    "dq": {
        ("mma16", 64): _MMA16_DQ, ("mma16", 128): _MMA16_DQ,
        ("tf32", 64): [(64, 32, 4, 2), (64, 16, 4, 2), (128, 32, 8, 2)],
        ("tf32", 128): [(64, 16, 4, 2), (64, 32, 8, 2), (64, 16, 8, 2), (128, 32, 8, 2)],
        ("ieee", 64): [(32, 32, 4, 2), (32, 16, 4, 2)],
        ("ieee", 128): [(16, 16, 4, 1), (16, 16, 8, 1)],
    },
}
def _configs(kernel: str):
    """One triton.Config per distinct shape over all classes (the pruning below picks a class's)."""
    shapes = dict.fromkeys(shape for per_class in _CONFIGS[kernel].values() for shape in per_class)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes]


def _config_class(dtype: torch.dtype, precision: str, block_d: int):
    unit = "mma16" if dtype != torch.float32 else "tf32" if precision == "tf32" else "ieee"
    return unit, 64 if block_d <= 64 else 128


def _prune_by_class(kernel: str, configs, named_args, **kwargs):
    """Only the configs made for this call's matrix unit (16-bit MMA, TF32 MMA, or FMA) and head-dim
    tile, recognised by their shape (torch.compile hands the pruning copies of the configs)."""
    wanted = set(_CONFIGS[kernel][_config_class(named_args["Q"].dtype, kwargs["DOT_PRECISION"], kwargs["BLOCK_D"])])
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


def _tuned(kernel, which: str, key):
    prune = functools.partial(_prune_by_class, which)
    return triton.autotune(_configs(which), key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def _dkdv_precision(precision: str, block_d: int) -> str:
    # Every TF32 dK/dV tile at a 128-wide head dim spills on sm_90 (two [BLOCK_N, 128] float32
    # accumulators plus float32 K and V tiles): those run IEEE FMA dots, which is only more exact.
    return "ieee" if precision == "tf32" and block_d > 64 else precision


# The ragged tail of the streamed axis goes in tiles of this many rows: the K step of bf16/fp16 MMAs.
_TAIL = 16

if _INTERPRET:
    _fwd = _attn_fwd_kernel
    _bwd_dkdv = _attn_bwd_dkdv_kernel
    _bwd_dq = _attn_bwd_dq_kernel
    _FIXED_BLOCKS = {"BLOCK_M": _INTERPRET_BLOCK, "BLOCK_N": _INTERPRET_BLOCK}
else:  # pragma: no cover - needs a GPU
    _fwd = _tuned(_attn_fwd_kernel, "fwd", ["L", "HEAD_DIM", "EXPORT_CLS", "DOT_PRECISION"])
    _bwd_dkdv = _tuned(_attn_bwd_dkdv_kernel, "dkdv", ["L", "HEAD_DIM", "DOT_PRECISION"])
    _bwd_dq = _tuned(_attn_bwd_dq_kernel, "dq", ["L", "HEAD_DIM", "DOT_PRECISION"])
    _FIXED_BLOCKS = {}

_DELTA_BLOCK_M = 64


def _grid_rows(B: int, H: int, L: int, block: str):
    return lambda meta: (cdiv(L, meta[block]) * B * H,)


def _dot_precision(dtype: torch.dtype) -> str:
    # Only float32 inputs are affected; follow PyTorch's matmul TF32 switch (off by default).
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast_bf16(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _strides(t: torch.Tensor):
    return tuple(t.stride())


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_cls_attn: bool, num_prefix_tokens: int
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Launch the forward kernel: ``(out, lse, cls_attn or None)``; lse is [B, H, L] float32, base 2."""
    B, H, L, Dh = q.shape
    # out is [B, H, L, Dh] stored as [B, L, H, Dh]: timm's transpose(1, 2).reshape(B, L, C) is then free.
    out = torch.empty(B, L, H, Dh, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    num_patches = L - num_prefix_tokens
    cls_head = torch.empty(B, H, num_patches if return_cls_attn else 0, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        out.zero_()
        cls = cls_head.sum(1) if return_cls_attn else None
        return out, lse.zero_(), cls
    wrap_triton(_fwd)[_grid_rows(B, H, L, "BLOCK_M")](
        q, k, v, out, lse, cls_head,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, L, Dh, num_prefix_tokens, scale * LOG2E,
        BLOCK_D=_block_d(Dh), TAIL_N=_TAIL, EXPORT_CLS=bool(return_cls_attn), DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST_BF16=_upcast_bf16(q.dtype), **_FIXED_BLOCKS,
    )
    # The head mean over a [B, H, L-p] float32 buffer: tiny next to the attention, and deterministic.
    cls = cls_head.mean(dim=1) if return_cls_attn else None
    return out, lse, cls


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, need_dq: bool = True, need_dkdv: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dq, dk, dv (contiguous, in q.dtype) from the output gradient and the saved forward results.

    ``need_dq`` / ``need_dkdv`` False skip the kernel that produces them (returned as None).
    """
    B, H, L, Dh = q.shape
    dq = torch.empty(B, H, L, Dh, dtype=q.dtype, device=q.device) if need_dq else None
    dk = torch.empty(B, H, L, Dh, dtype=q.dtype, device=q.device) if need_dkdv else None
    dv = torch.empty_like(dk) if need_dkdv else None
    if q.numel() == 0 or not (need_dq or need_dkdv):
        return tuple(None if g is None else g.zero_() for g in (dq, dk, dv))
    block_d = _block_d(Dh)
    precision = _dot_precision(q.dtype)
    upcast = _upcast_bf16(q.dtype)
    delta = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    wrap_triton(_attn_bwd_delta_kernel)[(cdiv(L, _DELTA_BLOCK_M) * B * H,)](
        out, dout, delta, *_strides(out), *_strides(dout), H, L, Dh, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=block_d,
    )
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    if need_dkdv:
        wrap_triton(_bwd_dkdv)[_grid_rows(B, H, L, "BLOCK_N")](
            q, k, v, dout, lse, delta, dk, dv, *common, *_strides(dk),
            H, L, Dh, scale, scale * LOG2E, BLOCK_D=block_d, TAIL_M=_TAIL,
            DOT_PRECISION=_dkdv_precision(precision, block_d), UPCAST_BF16=upcast,
            **_FIXED_BLOCKS,
        )
    if need_dq:
        wrap_triton(_bwd_dq)[_grid_rows(B, H, L, "BLOCK_M")](
            q, k, v, dout, lse, delta, dq, *common, *_strides(dq),
            H, L, Dh, scale, scale * LOG2E, BLOCK_D=block_d, TAIL_N=_TAIL, DOT_PRECISION=precision, UPCAST_BF16=upcast,
            **_FIXED_BLOCKS,
        )
    return dq, dk, dv
