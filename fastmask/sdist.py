"""Self-distillation loss (DINO / iBOT) as a registered operator that never keeps ``[rows, K]`` float32.

    loss = sum_{q, v, b} pair_weight[q, v] * row_weight[b] * CE(teacher row (q, b), student row (v, b))
    CE   = -sum_k softmax((t_qb - center) / teacher_temp)_k * log_softmax(s_vb / student_temp)_k

``student [V*B, K]`` and ``teacher [G*B, K]`` are view-major (rows ``v*B + b``), as the multi-crop
wrapper emits them.  DINO's CLS loss is ``pair_weight = (1 - same view) / n_pairs``, ``row_weight =
1/B``; iBOT's patch loss over the masked tokens is ``G = V = 1`` with one row per masked token and its
normalisation in ``row_weight``.  The teacher is a target: it gets no gradient.

``sdist_loss_reference`` is the specification.  The op (``torch.ops.fastmask.sdist_loss``) computes
per-row log-sum-exps and per-pair dot products in slices of the prototypes (``kernels/sdist_loss.py``
on the ``triton`` backend; float32 slices of bounded size on ``torch``), combines the slices exactly
(max-rescaling), and saves only its inputs and two ``[rows]`` vectors; its backward recomputes both
softmaxes slice by slice.  ``sdist_loss_linear`` also takes the head's last layer: it is given the
bottleneck ``z [V*B, D]`` and the prototypes ``weight [K, D]`` and computes the logits one slice at a
time (``z @ weight[k0:k1].T`` in ``z``'s dtype), so the student logits never exist in full, in
forward or backward (backward recomputes each slice: one extra GEMM of the last layer, as fused
linear cross-entropy kernels for language models do).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._backend import select

__all__ = ["sdist_loss", "sdist_loss_linear", "sdist_loss_reference"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# float32 elements of one slice on the torch backend (rows x slice width): bounds its working memory.
_TORCH_SLICE_ELEMS = 1 << 22
# Prototypes per GEMM slice of the fused-linear path (its logits slice is [rows, this]).
_LINEAR_SLICE = 8192


# ------------------------------------------------------------------------------------ reference

def sdist_loss_reference(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float,
                         teacher_temp: float, pair_weight: Tensor, row_weight: Tensor) -> Tensor:
    """The specification, in plain PyTorch (builds every softmax in float32)."""
    b = row_weight.numel()
    K = student.shape[-1]
    s_logp = torch.log_softmax(student.float() / student_temp, dim=-1).reshape(-1, b, K)
    t_prob = torch.softmax((teacher.float() - center.reshape(1, K).float()) / teacher_temp, dim=-1)
    t_prob = t_prob.detach().reshape(-1, b, K)
    ce = -torch.einsum("qbk,vbk->qvb", t_prob, s_logp)
    return (ce * pair_weight.float()[:, :, None] * row_weight.float()[None, None, :]).sum()


# ------------------------------------------------------------------------------ slice primitives

def _torch_partial_stats(student, teacher, center, batch, inv_ts, inv_tt):
    """What ``kernels.sdist_loss.partial_stats`` computes, with one block = the whole slice."""
    K = student.shape[1]
    s = student.float()
    y = s * inv_ts
    s_max = y.amax(dim=1)
    s_sum = torch.exp(y - s_max[:, None]).sum(dim=1)
    x = (teacher.float() - center.float()[None, :]) * inv_tt
    t_max = x.amax(dim=1)
    e = torch.exp(x - t_max[:, None])
    t_sum = e.sum(dim=1)
    dot = torch.einsum("qbk,vbk->qvb", e.reshape(-1, batch, K), s.reshape(-1, batch, K))
    return s_max[None], s_sum[None], t_max[None], t_sum[None], dot[None]


def _torch_grad_student(student, teacher, center, s_lse, t_lse, coef, inv_ts, inv_tt, out):
    batch, K = coef.shape[2], student.shape[1]
    q = torch.exp(student.float() * inv_ts - s_lse[:, None]).reshape(-1, batch, K)
    p = torch.exp((teacher.float() - center.float()[None, :]) * inv_tt - t_lse[:, None]).reshape(-1, batch, K)
    grad = (coef.sum(dim=0)[:, :, None] * q - torch.einsum("qvb,qbk->vbk", coef, p)) * inv_ts
    out.copy_(grad.reshape(-1, K))
    return out


def _primitives(backend: str):
    if backend == "triton":
        from .kernels import sdist_loss as k

        return k.partial_stats, k.grad_student
    return _torch_partial_stats, _torch_grad_student


def _slices(K: int, rows: int, backend: str, width: Optional[int] = None) -> List[Tuple[int, int]]:
    if width is None:
        # The kernel blocks internally: one slice.  The torch path bounds its float32 temporaries.
        width = K if backend == "triton" else max(128, _TORCH_SLICE_ELEMS // max(1, rows))
    return [(k0, min(K, k0 + width)) for k0 in range(0, K, width)]


def _lse(m: Tensor, z: Tensor) -> Tuple[Tensor, Tensor]:
    """Combine block partials ``(max, sum of exp(. - max))`` [nb, R] -> (max [R], log-sum-exp [R])."""
    top = m.amax(dim=0)
    return top, top + torch.log((z * torch.exp(m - top)).sum(dim=0))


def _combine(parts, batch: int, inv_ts: float, pair_weight: Tensor, row_weight: Tensor):
    s_max, s_sum, t_max, t_sum, dot = (torch.cat(p) for p in zip(*parts))
    _, s_lse = _lse(s_max, s_sum)
    t_top, t_lse = _lse(t_max, t_sum)
    scale = torch.exp(t_max - t_top)  # [nb, G*B]
    G = t_max.shape[1] // batch
    z = (t_sum * scale).sum(dim=0).reshape(G, 1, batch)
    d = (dot * scale.reshape(-1, G, 1, batch)).sum(dim=0)  # [G, V, B]
    V = s_max.shape[1] // batch
    ce = s_lse.reshape(1, V, batch) - inv_ts * d / z
    loss = (ce * pair_weight.float()[:, :, None] * row_weight.float()[None, None, :]).sum()
    return loss, s_lse, t_lse


def _coef(grad_loss: Tensor, pair_weight: Tensor, row_weight: Tensor) -> Tensor:
    return (grad_loss.float() * pair_weight.float()[:, :, None] * row_weight.float()[None, None, :]).contiguous()


# ------------------------------------------------------------------------------ registered ops

@torch.library.custom_op("fastmask::sdist_loss", mutates_args=())
def _sdist_loss_op(student: Tensor, teacher: Tensor, center: Tensor, pair_weight: Tensor, row_weight: Tensor,
                   student_temp: float, teacher_temp: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    batch = row_weight.numel()
    inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
    stats, _ = _primitives(backend)
    parts = [stats(student[:, k0:k1], teacher[:, k0:k1], center[k0:k1], batch, inv_ts, inv_tt)
             for k0, k1 in _slices(student.shape[1], student.shape[0] + teacher.shape[0], backend)]
    return _combine(parts, batch, inv_ts, pair_weight, row_weight)


@_sdist_loss_op.register_fake
def _(student, teacher, center, pair_weight, row_weight, student_temp, teacher_temp, backend):
    f32 = dict(device=student.device, dtype=torch.float32)
    return (student.new_empty((), dtype=torch.float32), torch.empty(student.shape[0], **f32),
            torch.empty(teacher.shape[0], **f32))


@torch.library.custom_op("fastmask::sdist_loss_backward", mutates_args=())
def _sdist_loss_backward_op(grad_loss: Tensor, student: Tensor, teacher: Tensor, center: Tensor,
                            pair_weight: Tensor, row_weight: Tensor, s_lse: Tensor, t_lse: Tensor,
                            student_temp: float, teacher_temp: float, backend: str) -> Tensor:
    coef = _coef(grad_loss, pair_weight, row_weight)
    _, grad = _primitives(backend)
    out = torch.empty_like(student, memory_format=torch.contiguous_format)
    for k0, k1 in _slices(student.shape[1], student.shape[0] + teacher.shape[0], backend):
        grad(student[:, k0:k1], teacher[:, k0:k1], center[k0:k1], s_lse, t_lse, coef,
             1.0 / student_temp, 1.0 / teacher_temp, out[:, k0:k1])
    return out


@_sdist_loss_backward_op.register_fake
def _(grad_loss, student, teacher, center, pair_weight, row_weight, s_lse, t_lse, student_temp, teacher_temp,
      backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _sdist_setup(ctx, inputs, output):
    student, teacher, center, pair_weight, row_weight, student_temp, teacher_temp, backend = inputs
    _, s_lse, t_lse = output
    ctx.save_for_backward(student, teacher, center, pair_weight, row_weight, s_lse, t_lse)
    ctx.temps, ctx.backend = (student_temp, teacher_temp), backend


def _sdist_backward(ctx, grad_loss, _grad_s_lse, _grad_t_lse):
    student, teacher, center, pair_weight, row_weight, s_lse, t_lse = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _sdist_loss_backward_op(grad_loss, student, teacher, center, pair_weight, row_weight, s_lse, t_lse,
                                       *ctx.temps, ctx.backend)
    return grad, None, None, None, None, None, None, None


_sdist_loss_op.register_autograd(_sdist_backward, setup_context=_sdist_setup)


@torch.library.custom_op("fastmask::sdist_loss_linear", mutates_args=())
def _sdist_linear_op(z: Tensor, weight: Tensor, teacher: Tensor, center: Tensor, pair_weight: Tensor,
                     row_weight: Tensor, student_temp: float, teacher_temp: float, slice_width: int,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    batch = row_weight.numel()
    inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
    stats, _ = _primitives(backend)
    parts = []
    for k0, k1 in _slices(weight.shape[0], z.shape[0], backend, slice_width):
        logits = z @ weight[k0:k1].to(z.dtype).t()
        for j0, j1 in _slices(k1 - k0, z.shape[0] + teacher.shape[0], backend):
            parts.append(stats(logits[:, j0:j1], teacher[:, k0 + j0:k0 + j1], center[k0 + j0:k0 + j1],
                               batch, inv_ts, inv_tt))
    return _combine(parts, batch, inv_ts, pair_weight, row_weight)


@_sdist_linear_op.register_fake
def _(z, weight, teacher, center, pair_weight, row_weight, student_temp, teacher_temp, slice_width, backend):
    f32 = dict(device=z.device, dtype=torch.float32)
    return (z.new_empty((), dtype=torch.float32), torch.empty(z.shape[0], **f32),
            torch.empty(teacher.shape[0], **f32))


@torch.library.custom_op("fastmask::sdist_loss_linear_backward", mutates_args=())
def _sdist_linear_backward_op(grad_loss: Tensor, z: Tensor, weight: Tensor, teacher: Tensor, center: Tensor,
                              pair_weight: Tensor, row_weight: Tensor, s_lse: Tensor, t_lse: Tensor,
                              student_temp: float, teacher_temp: float, slice_width: int,
                              backend: str) -> Tuple[Tensor, Tensor]:
    coef = _coef(grad_loss, pair_weight, row_weight)
    _, grad = _primitives(backend)
    grad_z = torch.zeros(z.shape, device=z.device, dtype=torch.float32)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
    for k0, k1 in _slices(weight.shape[0], z.shape[0], backend, slice_width):
        w = weight[k0:k1].to(z.dtype)
        logits = z @ w.t()  # recomputed: the forward kept nothing of this size
        g_logits = torch.empty_like(logits)
        for j0, j1 in _slices(k1 - k0, z.shape[0] + teacher.shape[0], backend):
            grad(logits[:, j0:j1], teacher[:, k0 + j0:k0 + j1], center[k0 + j0:k0 + j1], s_lse, t_lse, coef,
                 1.0 / student_temp, 1.0 / teacher_temp, g_logits[:, j0:j1])
        grad_z += (g_logits @ w).float()
        grad_w[k0:k1] = (g_logits.t() @ z).to(weight.dtype)
    return grad_z.to(z.dtype), grad_w


@_sdist_linear_backward_op.register_fake
def _(grad_loss, z, weight, teacher, center, pair_weight, row_weight, s_lse, t_lse, student_temp, teacher_temp,
      slice_width, backend):
    return torch.empty_like(z), torch.empty_like(weight, memory_format=torch.contiguous_format)


def _linear_setup(ctx, inputs, output):
    z, weight, teacher, center, pair_weight, row_weight, student_temp, teacher_temp, slice_width, backend = inputs
    _, s_lse, t_lse = output
    ctx.save_for_backward(z, weight, teacher, center, pair_weight, row_weight, s_lse, t_lse)
    ctx.args = (student_temp, teacher_temp, slice_width, backend)


def _linear_backward(ctx, grad_loss, _grad_s_lse, _grad_t_lse):
    z, weight, teacher, center, pair_weight, row_weight, s_lse, t_lse = ctx.saved_tensors
    grad_z = grad_w = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_z, grad_w = _sdist_linear_backward_op(grad_loss, z, weight, teacher, center, pair_weight, row_weight,
                                                   s_lse, t_lse, *ctx.args)
    return grad_z, grad_w, None, None, None, None, None, None, None, None


_sdist_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------ public functions

def _check(student: Tensor, teacher: Tensor, center: Tensor, student_temp, teacher_temp,
           pair_weight: Optional[Tensor], row_weight: Optional[Tensor], k: int, s_name: str):
    for name, t in ((s_name, student), ("teacher", teacher)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [rows, K], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != student.device:
            raise ValueError(f"{name} is on {t.device} but {s_name} is on {student.device}")
    if teacher.shape[1] != k:
        raise ValueError(f"teacher has {teacher.shape[1]} prototypes, the student {k}")
    if not isinstance(center, Tensor) or center.numel() != k or center.device != student.device:
        raise ValueError(f"center must hold K={k} values on {student.device}, got "
                         f"{tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__}")
    for name, temp in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if not float(temp) > 0:
            raise ValueError(f"{name} must be > 0, got {temp}")
    if row_weight is None:
        raise ValueError("row_weight [B] is required (e.g. torch.full((B,), 1 / B))")
    b = row_weight.numel()
    if b == 0 or student.shape[0] % b or teacher.shape[0] % b:
        raise ValueError(f"row_weight has B={b} entries; {s_name} ({student.shape[0]} rows) and teacher "
                         f"({teacher.shape[0]} rows) must be views x B")
    g, v = teacher.shape[0] // b, student.shape[0] // b
    if pair_weight is None or tuple(pair_weight.shape) != (g, v):
        raise ValueError(f"pair_weight must be [G={g}, V={v}] (teacher views x student views), got "
                         f"{None if pair_weight is None else tuple(pair_weight.shape)}")
    f32 = dict(device=student.device, dtype=torch.float32)
    # A copy of the centre: callers update theirs in place after the forward (backward needs this one).
    return (center.detach().reshape(k).to(**f32, copy=True), pair_weight.detach().to(**f32).contiguous(),
            row_weight.detach().reshape(b).to(**f32).contiguous())


def sdist_loss(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float, teacher_temp: float, *,
               pair_weight: Tensor, row_weight: Tensor, backend: Optional[str] = None) -> Tensor:
    """Self-distillation cross-entropy (see the module docstring); a float32 scalar.

    student [V*B, K] and teacher [G*B, K] logits (fp32/bf16/fp16, view-major rows), center [K] (or
    [1, K]), pair_weight [G, V], row_weight [B].  Gradient flows to ``student`` only.
    """
    center, pair_weight, row_weight = _check(student, teacher, center, student_temp, teacher_temp,
                                             pair_weight, row_weight, student.shape[-1] if student.dim() else 0,
                                             "student")
    name = select("sdist_loss", student.device, backend)
    return _sdist_loss_op(student, teacher.detach(), center, pair_weight, row_weight, float(student_temp),
                          float(teacher_temp), name)[0]


def sdist_loss_linear(z: Tensor, weight: Tensor, teacher: Tensor, center: Tensor, student_temp: float,
                      teacher_temp: float, *, pair_weight: Tensor, row_weight: Tensor,
                      slice_width: int = _LINEAR_SLICE, backend: Optional[str] = None) -> Tensor:
    """``sdist_loss(z @ weight.T, ...)`` without the student logits ever existing in full.

    z [V*B, D] (the head's normalised bottleneck), weight [K, D] (the last layer's weight, e.g.
    ``WeightNormLinear.weight``, already normalised; each slice is cast to z's dtype as ``F.linear``
    under AMP would); gradients flow to both (``weight``'s in its own dtype).
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not isinstance(z, Tensor) or z.dim() != 2 \
            or weight.shape[1] != z.shape[1]:
        raise ValueError(f"z must be [rows, D] and weight [K, D], got {getattr(z, 'shape', z)} and "
                         f"{getattr(weight, 'shape', weight)}")
    if isinstance(slice_width, bool) or not isinstance(slice_width, int) or slice_width < 1:
        raise ValueError(f"slice_width must be a positive int, got {slice_width!r}")
    center, pair_weight, row_weight = _check(z, teacher, center, student_temp, teacher_temp, pair_weight,
                                             row_weight, weight.shape[0], "z")
    name = select("sdist_loss", z.device, backend)
    # The weight is cast one slice at a time (a bf16 copy of all of it would be saved otherwise).
    return _sdist_linear_op(z, weight, teacher.detach(), center, pair_weight, row_weight,
                            float(student_temp), float(teacher_temp), slice_width, name)[0]
