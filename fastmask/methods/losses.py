"""Self-distillation losses shared by ``dino`` and ``ibot``.

* :class:`DINOLoss` — cross-entropy between the sharpened, centred teacher distribution of each
  global view and the student distribution of every *other* view (all global and local crops).
* :class:`IBOTLoss` — DINO's loss on the CLS token plus the masked-image-modelling loss on the
  patch tokens hidden in the student's global view (same view, teacher on the clean image), with
  a separate center for each.

Both compute the cross-entropies one of two ways, equal within float rounding (tests compare them):
``fused=False`` builds today's ``softmax``/``log_softmax`` over every row (what the official code
does; autograd keeps ``[rows, K]`` float32 tensors), ``fused=True`` calls ``fastmask.ops.sdist_loss``,
which works through the rows in chunks and recomputes in backward (no ``[rows, K]`` float32 tensor
is saved).  iBOT's patch term takes either the full ``[2B, N, K]`` student patch output or only the
rows of the masked tokens (``masked_ids``): the loss only reads those, so the student's patch head
needs to run on nothing else.

Centers are buffers (checkpointed with the method) updated with an EMA of the batch mean of the
teacher outputs, averaged over ranks under DDP.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import ops
from .schedules import teacher_temp_at

__all__ = ["DINOLoss", "IBOTLoss", "masked_token_ids", "teacher_temperature"]


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Linear warm-up of the teacher temperature over the first ``warmup_epochs`` (DINO: 0.04 -> 0.07):
    ``schedules.teacher_temp_at`` with ``rule="linear"``."""
    return teacher_temp_at(epoch, warmup_temp, temp, warmup_epochs, rule="linear")


def masked_token_ids(masks: torch.Tensor) -> torch.Tensor:
    """Flat positions ``[1, M]`` (ascending) of the hidden tokens of ``masks`` [R, N] in its ``[R*N]``
    flattening: the ids ``ops.gather_tokens`` takes to pick them from tokens viewed as ``[1, R*N, D]``.

    M is data-dependent, so this waits for the device once (the price of not running the head on the
    ~85% of tokens nobody reads)."""
    if masks.dtype != torch.bool or masks.dim() != 2:
        raise ValueError(f"masks must be a bool tensor [R, N], got {masks.dtype} {tuple(masks.shape)}")
    return torch.nonzero(masks.reshape(-1)).reshape(1, -1)


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` [1, M] of ``x`` [R, N, C] in its ``[R*N, C]`` flattening: ``[M, C]``."""
    return ops.gather_tokens(x.reshape(1, -1, x.shape[-1]), ids)[0]


@torch.no_grad()
def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over rows, averaged over ranks (so every rank keeps the same center)."""
    total = x.sum(dim=0, keepdim=True, dtype=torch.float32)  # no float32 copy of a bf16 x
    # A fill, not a host-to-device copy: capturable in a CUDA graph.
    count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count


def _cross_view_weights(n_global: int, n_crops: int, device) -> torch.Tensor:
    """[n_global, n_crops] weights of the (teacher view, student view) pairs: every pair but the same
    view, averaged (DINO's ``total_loss / n_loss_terms``)."""
    # Built out of place: fill_diagonal_ on a slice is an as_strided mutation AOTAutograd refuses.
    views = torch.arange(n_crops, device=device)
    w = (views[None, :] != views[:n_global, None]).float()
    return w / w.sum().clamp_min(1.0)


def _sdist(student, teacher, center, student_temp, teacher_temp, pair_w, row_w) -> torch.Tensor:
    """``ops.sdist_loss`` on logits, or ``ops.sdist_loss_linear`` on ``(bottleneck z, last-layer weight)``."""
    if isinstance(student, tuple):
        z, weight = student
        return ops.sdist_loss_linear(z, weight, teacher, center, student_temp, teacher_temp,
                                     pair_weight=pair_w, row_weight=row_w)
    return ops.sdist_loss(student, teacher, center, student_temp, teacher_temp, pair_weight=pair_w, row_weight=row_w)


def _cross_view_ce(student, teacher: torch.Tensor, center: torch.Tensor, n_global: int,
                   student_temp: float, teacher_temp: float, fused: bool) -> torch.Tensor:
    """Mean over (teacher view q, student view v != q) pairs of the batch-mean cross-entropy.
    ``student``: logits, or ``(z, weight)`` of a head whose last layer the loss applies itself."""
    b = teacher.shape[0] // n_global
    n_crops = (student[0] if isinstance(student, tuple) else student).shape[0] // b
    if fused or isinstance(student, tuple):
        pair_w = _cross_view_weights(n_global, n_crops, teacher.device)
        row_w = torch.full((b,), 1.0 / b, device=teacher.device)
        return _sdist(student, teacher, center, student_temp, teacher_temp, pair_w, row_w)
    s_logp = F.log_softmax(student.float() / student_temp, dim=-1).chunk(n_crops)
    t_prob = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, n_terms = 0.0, 0
    for iq, q in enumerate(t_prob):
        for v in range(n_crops):
            if v == iq:
                continue  # same view: no loss (the teacher saw the same crop)
            total = total + torch.sum(-q * s_logp[v], dim=-1).mean()
            n_terms += 1
    return total / max(1, n_terms)


class DINOLoss(nn.Module):
    """DINO loss over all (teacher global view, other student view) pairs.

    ``student_out`` is ``[n_crops * B, K]`` (global crops first, crop-major as the multi-crop
    wrapper emits them), or ``(z [n_crops * B, bottleneck], weight [K, bottleneck])`` to fuse the
    head's last layer into the loss (``ops.sdist_loss_linear``); ``teacher_out`` is ``[n_global * B, K]``.
    """

    def __init__(self, out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, fused: bool = False):
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.fused = fused
        self.register_buffer("center", torch.zeros(1, out_dim))

    def cls_loss(self, student_out, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The cross-view term against the current centre (the centre is left as it is)."""
        return _cross_view_ce(student_out, teacher_out.detach(), self.center, self.n_global,
                              self.student_temp, teacher_temp, self.fused)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                update_center: bool = True) -> torch.Tensor:
        loss = self.cls_loss(student_out, teacher_out, teacher_temp)
        if update_center:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        self.center.mul_(self.center_momentum).add_(_batch_mean(teacher_out), alpha=1 - self.center_momentum)


class IBOTLoss(DINOLoss):
    """iBOT: CLS loss (DINO's, cross-view, its centre) + patch loss (MIM, same view, masked positions only).

    ``student_cls`` ``[n_crops*B, K]``, ``teacher_cls`` ``[n_global*B, K]``; ``teacher_patch``
    ``[n_global*B, N, K]``; ``masks`` ``[n_global*B, N]`` bool (True = hidden in the student).
    ``student_patch`` is ``[n_global*B, N, K]``, or with ``masked_ids`` (``masked_token_ids(masks)``)
    only the rows of the hidden tokens, ``[M, K]`` in that order; with ``masked_ids`` both
    ``student_cls`` and ``student_patch`` may also be ``(z, weight)`` (the head's bottleneck and last
    layer: the loss applies the layer itself, ``ops.sdist_loss_linear``).  The patch term of a view is the
    mean over each sample's masked positions, averaged over all the view's samples (those without
    any count 0), then over views: iBOT's normalisation.
    """

    def __init__(self, out_dim: int, patch_out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum_patch: float = 0.9,
                 lambda_cls: float = 1.0, lambda_patch: float = 1.0, fused: bool = False):
        super().__init__(out_dim, n_global=n_global, student_temp=student_temp, center_momentum=center_momentum,
                         fused=fused)
        self.center_momentum_patch = center_momentum_patch
        self.lambda_cls = lambda_cls
        self.lambda_patch = lambda_patch
        self.register_buffer("center_patch", torch.zeros(1, 1, patch_out_dim))

    def patch_loss(self, student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
                   teacher_patch_temp: float, masked_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MIM term (before ``lambda_patch``): see the class docstring for the shapes."""
        rows, n = masks.shape
        b = rows // self.n_global
        fused_linear = isinstance(student_patch, tuple)  # (z [M, bottleneck], last-layer weight)
        if masked_ids is None and torch.compiler.is_compiling():
            return self._dense_patch_loss(student_patch, teacher_patch, masks, teacher_patch_temp)
        if fused_linear and masked_ids is None:
            raise ValueError("student_patch as (z, weight) needs masked_ids (z holds the masked rows only)")
        rows_given = student_patch[0] if fused_linear else student_patch
        if masked_ids is None:
            masked_ids = masked_token_ids(masks)
            student_patch = gather_rows(student_patch, masked_ids)
        elif rows_given.dim() != 2 or rows_given.shape[0] != masked_ids.shape[-1]:
            raise ValueError(f"with masked_ids [1, M={masked_ids.shape[-1]}], student_patch must be [M, K], "
                             f"got {tuple(rows_given.shape)}")
        teacher_rows = gather_rows(teacher_patch.detach(), masked_ids)
        # Per masked token: 1 / (its sample's masked count * samples per view * views).
        per_sample = 1.0 / (masks.sum(dim=1).clamp_min(1).float() * (b * self.n_global))
        row_w = per_sample[masked_ids[0] // n]
        if masked_ids.shape[-1] == 0:
            return rows_given.sum() * 0.0  # nothing masked anywhere: 0, still on the graph
        return self._weighted_patch_ce(student_patch, teacher_rows, row_w, teacher_patch_temp)

    def _dense_patch_loss(self, student_patch, teacher_patch: torch.Tensor, masks: torch.Tensor,
                          teacher_patch_temp: float) -> torch.Tensor:
        """``patch_loss`` over every position [R*N] weighted by its mask (0 where visible): what a compiled
        step computes, since gathering the M hidden rows gives a data-dependent shape (a graph break,
        and a sync that a CUDA graph cannot hold).  ``student_patch``: [R, N, K] or (z [R, N, d], weight)."""
        rows, n = masks.shape
        per_sample = 1.0 / (masks.sum(dim=1).clamp_min(1).float() * rows)
        row_w = (masks.float() * per_sample[:, None]).reshape(-1)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        fused_linear = isinstance(student_patch, tuple)
        student = (flat(student_patch[0]), student_patch[1]) if fused_linear else flat(student_patch)
        return self._weighted_patch_ce(student, flat(teacher_patch.detach()), row_w, teacher_patch_temp)

    def _weighted_patch_ce(self, student, teacher: torch.Tensor, row_w: torch.Tensor,
                           teacher_patch_temp: float) -> torch.Tensor:
        """``sum_r row_w[r] * CE(teacher row r, student row r)`` against the patch centre; ``student``:
        rows [R, K], or ``(z [R, d], weight)``."""
        center = self.center_patch.reshape(1, -1)
        if self.fused or isinstance(student, tuple):
            return _sdist(student, teacher, center, self.student_temp, teacher_patch_temp,
                          torch.ones(1, 1, device=row_w.device), row_w)
        s_logp = F.log_softmax(student.float() / self.student_temp, dim=-1)
        t_prob = F.softmax((teacher.float() - center) / teacher_patch_temp, dim=-1)
        return (torch.sum(-t_prob * s_logp, dim=-1) * row_w).sum()

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks,
                teacher_temp: float, teacher_patch_temp: float,
                masked_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        cls_loss = self.cls_loss(student_cls, teacher_cls, teacher_temp) * self.lambda_cls
        patch_loss = self.patch_loss(student_patch, teacher_patch, masks, teacher_patch_temp,
                                     masked_ids) * self.lambda_patch
        self.update_center(teacher_cls)
        self.update_patch_center(teacher_patch)
        return cls_loss + patch_loss, {"loss_cls": cls_loss.detach(), "loss_patch": patch_loss.detach()}

    @torch.no_grad()
    def update_patch_center(self, teacher_patch: torch.Tensor) -> None:
        # The official centre: mean over every teacher patch token (not only the masked ones).
        patch_mean = _batch_mean(teacher_patch.mean(dim=1, dtype=torch.float32))
        self.center_patch.mul_(self.center_momentum_patch).add_(patch_mean[:, None, :],
                                                                alpha=1 - self.center_momentum_patch)
