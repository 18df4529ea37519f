"""Self-distillation cross-entropy (DINO / iBOT loss) in blocks of prototypes (Triton).

The loss over (teacher view q, student view v) pairs of sample b is
``CE = lse(s_vb / ts) - <softmax((t_qb - c) / tt), s_vb> / ts`` (the teacher distribution sums to 1).
Nothing of size ``[rows, K]`` is kept: the forward kernel reduces each ``BLOCK_K`` slice of the
prototypes to a few numbers per row and pair, the launcher's caller combines the slices, and the
backward kernel recomputes both softmaxes from the logits and the saved row log-sum-exps.

* ``partial_stats``: one program per (sample b, block of BLOCK_K prototypes).  It holds the G
  teacher rows of b in registers (``[G_P2, BLOCK_K]``), and streams the V student rows of b past
  them: per student row the block's max and sum of ``exp(s/ts - max)``, per teacher row the block's
  max and sum of ``exp(x - max)`` with ``x = (t - c)/tt``, and per pair the block's
  ``sum_k exp(x_k - max) * s_k``.  Block partials are combined with the usual max-rescaling
  (``fastmask.sdist``), which is exact in float32.
* ``grad_student``: one program per (b, block): ``grad[v, b] = (a_vb * softmax(s_vb/ts) -
  sum_q coef[q, v, b] * p_qb) / ts`` with ``a_vb = sum_q coef[q, v, b]``, written in the logits' dtype.

Logits may be bf16, fp16 or fp32 (math in fp32); rows need a unit column stride (a column slice of
a wider tensor is fine: the fused-linear path passes chunks).  Functions here assume valid input
(``fastmask.sdist`` checks it).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import cdiv, next_power_of_2

_GPU_BLOCK_K = 1024
_INTERPRETER_BLOCK_K = 256


def _gpu_launch(device: torch.device) -> bool:
    """GPU block sizes for tensors on ``device`` (else the interpreter's); one switch, so that
    ``tests/compile_for_gpu.py`` can compile the GPU configuration from CPU tensors."""
    return device.type == "cuda"


def _block_k(K: int, device: torch.device) -> int:
    cap = _GPU_BLOCK_K if _gpu_launch(device) else _INTERPRETER_BLOCK_K
    return max(16, min(cap, next_power_of_2(K)))


@triton.jit
def _teacher_block(T, C, stride_t, B, K, inv_tt, G: tl.constexpr, G_P2: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's (sample b, prototype block) and its G teacher rows in float32:
    ``(b, blk, offs, kmask, g, gmask, m2, x)`` with ``x = (t - c) / tt`` ([G_P2, BLOCK_K], unmasked)."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < K
    g = tl.arange(0, G_P2)
    gmask = g < G
    m2 = gmask[:, None] & kmask[None, :]
    t_rows = (g * B + b).to(tl.int64)
    t = tl.load(T + t_rows[:, None] * stride_t + offs[None, :], mask=m2, other=0.0).to(tl.float32)
    cen = tl.load(C + offs, mask=kmask, other=0.0).to(tl.float32)
    return b, blk, offs, kmask, g, gmask, m2, (t - cen[None, :]) * inv_tt


@triton.jit
def _student_row(S, stride_s, B, b, v, offs, kmask):
    """Row v * B + b of the student logits over the block, in float32: ``(row, s)``."""
    s_row = (v * B + b).to(tl.int64)
    return s_row, tl.load(S + s_row * stride_s + offs, mask=kmask, other=0.0).to(tl.float32)


@triton.jit
def _partial_stats_kernel(
    S, T, C, SM, SZ, TM, TZ, DOT,
    stride_s, stride_t, B, K, V, inv_ts, inv_tt,
    G: tl.constexpr, G_P2: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, blk, offs, kmask, g, gmask, m2, x = _teacher_block(T, C, stride_t, B, K, inv_tt, G, G_P2, BLOCK_K)
    x = tl.where(m2, x, float("-inf"))
    t_max = tl.max(x, axis=1)
    t_max = tl.where(gmask, t_max, 0.0)
    e = tl.exp(x - t_max[:, None])  # 0 where masked
    t_sum = tl.sum(e, axis=1)
    tl.store(TM + blk * G * B + g * B + b, t_max, mask=gmask)
    tl.store(TZ + blk * G * B + g * B + b, t_sum, mask=gmask)
    for v in range(V):
        _, s = _student_row(S, stride_s, B, b, v, offs, kmask)
        y = tl.where(kmask, s * inv_ts, float("-inf"))
        s_max = tl.max(y, axis=0)
        s_sum = tl.sum(tl.exp(y - s_max), axis=0)
        tl.store(SM + blk * V * B + v * B + b, s_max)
        tl.store(SZ + blk * V * B + v * B + b, s_sum)
        dot = tl.sum(e * s[None, :], axis=1)  # [G_P2]
        tl.store(DOT + ((blk * G + g) * V + v) * B + b, dot, mask=gmask)


@triton.jit
def _grad_student_kernel(
    S, T, C, S_LSE, T_LSE, COEF, GS,
    stride_s, stride_t, stride_gs, B, K, V, inv_ts, inv_tt,
    G: tl.constexpr, G_P2: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, blk, offs, kmask, g, gmask, m2, x = _teacher_block(T, C, stride_t, B, K, inv_tt, G, G_P2, BLOCK_K)
    t_lse = tl.load(T_LSE + g * B + b, mask=gmask, other=0.0)
    p = tl.exp(tl.where(m2, x - t_lse[:, None], float("-inf")))
    for v in range(V):
        s_row, s = _student_row(S, stride_s, B, b, v, offs, kmask)
        s_lse = tl.load(S_LSE + v * B + b)
        q = tl.exp(tl.where(kmask, s * inv_ts - s_lse, float("-inf")))
        coef = tl.load(COEF + (g * V + v) * B + b, mask=gmask, other=0.0)  # [G_P2]
        a = tl.sum(coef, axis=0)
        grad = (a * q - tl.sum(coef[:, None] * p, axis=0)) * inv_ts
        tl.store(GS + s_row * stride_gs + offs, grad.to(GS.dtype.element_ty), mask=kmask)


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def partial_stats(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, batch: int,
                  inv_ts: float, inv_tt: float) -> Tuple[torch.Tensor, ...]:
    """Block partials of one K-slice: ``s_max, s_sum [nb, V*B]``, ``t_max, t_sum [nb, G*B]``,
    ``dot [nb, G, V, B]`` (float32), for ``student [V*B, K]``, ``teacher [G*B, K]``, ``center [K]``."""
    student, teacher, center = _rowwise(student), _rowwise(teacher), center.contiguous()
    K = student.shape[1]
    V, G = student.shape[0] // batch, teacher.shape[0] // batch
    block = _block_k(K, student.device)
    nb = cdiv(K, block)
    f32 = dict(device=student.device, dtype=torch.float32)
    s_max, s_sum = torch.empty(nb, V * batch, **f32), torch.empty(nb, V * batch, **f32)
    t_max, t_sum = torch.empty(nb, G * batch, **f32), torch.empty(nb, G * batch, **f32)
    dot = torch.empty(nb, G, V, batch, **f32)
    if batch and K:
        _partial_stats_kernel[(batch, nb)](
            student, teacher, center, s_max, s_sum, t_max, t_sum, dot,
            student.stride(0), teacher.stride(0), batch, K, V, inv_ts, inv_tt,
            G=G, G_P2=max(2, next_power_of_2(G)), BLOCK_K=block, num_warps=4,
        )
    return s_max, s_sum, t_max, t_sum, dot


def grad_student(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, s_lse: torch.Tensor,
                 t_lse: torch.Tensor, coef: torch.Tensor, inv_ts: float, inv_tt: float,
                 out: torch.Tensor) -> torch.Tensor:
    """Writes the loss gradient of one K-slice of ``student`` into ``out`` (same shape, unit column
    stride); ``coef [G, V, B]`` is ``grad_loss * pair_weight[q, v] * row_weight[b]``."""
    student, teacher, center = _rowwise(student), _rowwise(teacher), center.contiguous()
    batch = coef.shape[2]
    K = student.shape[1]
    G, V = coef.shape[0], coef.shape[1]
    block = _block_k(K, student.device)
    if batch and K:
        _grad_student_kernel[(batch, cdiv(K, block))](
            student, teacher, center, s_lse.contiguous(), t_lse.contiguous(), coef.contiguous(), out,
            student.stride(0), teacher.stride(0), out.stride(0), batch, K, V, inv_ts, inv_tt,
            G=G, G_P2=max(2, next_power_of_2(G)), BLOCK_K=block, num_warps=4,
        )
    return out
