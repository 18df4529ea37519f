"""Self-distillation losses shared by ``dino`` and ``ibot``.

* :class:`DINOLoss` — cross-entropy between the sharpened, centred teacher distribution of each
  global view and the student distribution of every *other* view (all global and local crops).
* :class:`IBOTLoss` — DINO's loss on the CLS token plus the masked-image-modelling loss on the
  patch tokens hidden in the student's global view (same view, teacher on the clean image), with
  a separate center for each.

Centers are buffers (checkpointed with the method) updated with an EMA of the batch mean of the
teacher outputs, averaged over ranks under DDP.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOLoss", "IBOTLoss", "teacher_temperature"]


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Linear warm-up of the teacher temperature over the first ``warmup_epochs`` (DINO: 0.04 -> 0.07)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / warmup_epochs


@torch.no_grad()
def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over rows, averaged over ranks (so every rank keeps the same center)."""
    total = x.float().sum(dim=0, keepdim=True)
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count


class DINOLoss(nn.Module):
    """DINO loss over all (teacher global view, other student view) pairs.

    ``student_out`` is ``[n_crops * B, K]`` (global crops first, crop-major as the multi-crop
    wrapper emits them); ``teacher_out`` is ``[n_global * B, K]``.
    """

    def __init__(self, out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                update_center: bool = True) -> torch.Tensor:
        b = teacher_out.shape[0] // self.n_global
        n_crops = student_out.shape[0] // b
        s_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_crops)
        t_prob = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().chunk(self.n_global)
        total, n_terms = 0.0, 0
        for iq, q in enumerate(t_prob):
            for v in range(n_crops):
                if v == iq:
                    continue  # same view: no loss (the teacher saw the same crop)
                total = total + torch.sum(-q * s_logp[v], dim=-1).mean()
                n_terms += 1
        if update_center:
            self.update_center(teacher_out)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        self.center.mul_(self.center_momentum).add_(_batch_mean(teacher_out), alpha=1 - self.center_momentum)


class IBOTLoss(nn.Module):
    """iBOT: CLS loss (DINO, cross-view) + patch loss (MIM, same view, masked positions only).

    ``student_cls`` ``[n_crops*B, K]``, ``teacher_cls`` ``[n_global*B, K]``; ``student_patch`` and
    ``teacher_patch`` ``[n_global*B, N, K]``; ``masks`` ``[n_global*B, N]`` bool (True = hidden in
    the student).  The patch term of a view is the mean over its masked positions, averaged over
    the samples that have any (iBOT's normalisation).
    """

    def __init__(self, out_dim: int, patch_out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum_patch: float = 0.9,
                 lambda_cls: float = 1.0, lambda_patch: float = 1.0):
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum_patch = center_momentum_patch
        self.lambda_cls = lambda_cls
        self.lambda_patch = lambda_patch
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, patch_out_dim))

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks,
                teacher_temp: float, teacher_patch_temp: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        b = teacher_cls.shape[0] // self.n_global
        n_crops = student_cls.shape[0] // b
        s_cls = F.log_softmax(student_cls.float() / self.student_temp, dim=-1).chunk(n_crops)
        t_cls = F.softmax((teacher_cls.float() - self.center) / teacher_temp, dim=-1).detach().chunk(self.n_global)
        s_patch = F.log_softmax(student_patch.float() / self.student_temp, dim=-1).chunk(self.n_global)
        t_patch = F.softmax((teacher_patch.float() - self.center_patch) / teacher_patch_temp,
                            dim=-1).detach().chunk(self.n_global)
        m = masks.chunk(self.n_global)

        cls_total, n_cls = 0.0, 0
        patch_total, n_patch = 0.0, 0
        for q in range(self.n_global):
            for v in range(n_crops):
                if v == q:
                    # MIM term: the teacher's clean patch tokens supervise the student's masked ones.
                    mask = m[v].float()
                    per_token = torch.sum(-t_patch[q] * s_patch[v], dim=-1)  # [B, N]
                    per_sample = (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)
                    patch_total = patch_total + per_sample.mean()
                    n_patch += 1
                else:
                    cls_total = cls_total + torch.sum(-t_cls[q] * s_cls[v], dim=-1).mean()
                    n_cls += 1
        cls_loss = cls_total / max(1, n_cls) * self.lambda_cls
        patch_loss = patch_total / max(1, n_patch) * self.lambda_patch
        self.update_center(teacher_cls, teacher_patch)
        return cls_loss + patch_loss, {"loss_cls": cls_loss.detach(), "loss_patch": patch_loss.detach()}

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        self.center.mul_(self.center_momentum).add_(_batch_mean(teacher_cls), alpha=1 - self.center_momentum)
        patch_mean = _batch_mean(teacher_patch.float().mean(dim=1))  # mean over tokens, then samples
        self.center_patch.mul_(self.center_momentum_patch).add_(patch_mean[:, None, :],
                                                                alpha=1 - self.center_momentum_patch)
