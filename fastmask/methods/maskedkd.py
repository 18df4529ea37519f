"""MaskedKD: knowledge distillation whose teacher only sees the patches the student looks at
(Son et al., "The Role of Masking for Efficient Supervised Knowledge Distillation of Vision
Transformers").

Per batch:

1. the student runs on the full (mixed) images and exports the CLS attention map of its last block
   (head mean; ``fastmask.ops.attention`` computes it without materialising ``[B, H, L, L]``);
2. the ``teacher_keep`` patches the student's CLS token attends to most are kept
   (``fastmask.masking.maskedkd_patch_ids``); the teacher's CLS token is always kept;
3. the frozen teacher (eval mode, no grad) runs on those tokens only, so its cost falls with the
   number of kept tokens (about half the FLOPs at 98 of 196);
4. loss ``(1 - alpha) * L_cls(student, targets) + alpha * L_kd``, where ``L_kd`` is DeiT's soft
   distillation ``tau^2 KL(softmax(t/tau) || softmax(s/tau))`` or hard distillation
   ``CE(s, argmax t)``.

The teacher's FLOPs are counted every step (``fastmask.flops.FlopMeter``: hooks read the shapes the
teacher's layers really receive) and logged against a full-input teacher as
``teacher_gflops``, ``teacher_gflops_full`` and ``teacher_flops_ratio``.

``teacher_keep >= N`` is plain KD: the teacher runs on every token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import TeacherConfig
from ..flops import FlopMeter, count_flops
from .base import StepState, build_teacher
from .supervised import (SupervisedConfig, SupervisedMethod, autocast_for, build_classifier,
                          check_supervised_config, classification_loss, classifier_accuracy,
                          hard_distillation_loss, soft_distillation_loss, top1_accuracy)

__all__ = ["METHOD", "MaskedKD", "MaskedKDConfig", "DISTILLATION_KINDS", "resolve_keep", "select_teacher_tokens"]

DISTILLATION_KINDS = ("soft", "hard", "none")
TEACHER_SELECTIONS = ("attention", "random")
FLOP_COUNTERS = ("hooks", "dispatch")


@dataclass
class MaskedKDConfig(SupervisedConfig):
    """MaskedKD options; defaults are the paper's DeiT-S <- DeiT-B setting (DeiT recipe, soft KD)."""

    # The frozen teacher (a local timm/DeiT checkpoint; without one it is random: tests only). Its
    # patch size must be the student's: the student's CLS map picks the teacher's tokens.
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Kept patches: a count (>= 1, e.g. 98 of 196) or a fraction of N in (0, 1).  >= N: plain KD.
    teacher_keep: float = 98.0
    student_attn_layer: int = -1  # block whose CLS map ranks the patches (the paper: the last)
    # Which patches the teacher keeps: "attention" (the student's most attended: MaskedKD) or
    # "random" (a uniform random subset of the same size: the paper's random-masking control).
    teacher_select: str = "attention"
    distillation: str = "soft"
    alpha: float = 0.5
    tau: float = 1.0
    flop_counter: str = "hooks"  # "hooks" (any backend, cheap) or "dispatch" (FlopCounterMode)

    def __post_init__(self):
        check_maskedkd_config(self)


def check_maskedkd_config(cfg: MaskedKDConfig) -> None:
    check_supervised_config(cfg)
    if cfg.distillation not in DISTILLATION_KINDS:
        raise ValueError(f"method.distillation must be one of {DISTILLATION_KINDS}, got {cfg.distillation!r}")
    if cfg.teacher_select not in TEACHER_SELECTIONS:
        raise ValueError(f"method.teacher_select must be one of {TEACHER_SELECTIONS}, got {cfg.teacher_select!r}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"method.alpha must lie in [0, 1], got {cfg.alpha}")
    if not cfg.tau > 0:
        raise ValueError(f"method.tau must be > 0, got {cfg.tau}")
    keep = cfg.teacher_keep
    if not keep > 0 or (keep >= 1 and float(keep) != int(keep)):
        raise ValueError(
            f"method.teacher_keep must be a whole count >= 1 or a fraction in (0, 1), got {keep!r}"
        )
    if cfg.flop_counter not in FLOP_COUNTERS:
        raise ValueError(f"method.flop_counter must be one of {FLOP_COUNTERS}, got {cfg.flop_counter!r}")


def resolve_keep(teacher_keep: float, num_patches: int) -> int:
    """Kept patches for ``N = num_patches``: a count as given, a fraction as ``int(f * N)`` (at least
    one), both capped at N."""
    if teacher_keep < 1:
        return max(1, min(num_patches, int(teacher_keep * num_patches)))
    return min(num_patches, int(teacher_keep))


def select_teacher_tokens(cls_attn: torch.Tensor, keep: int) -> torch.Tensor:
    """Patch ids [B, keep] (ascending) the teacher runs on: the ``keep`` patches with the highest
    student CLS attention, ties to the lower index (``fastmask.masking.maskedkd_patch_ids``).

    Patch ids rather than full-sequence ids (``maskedkd_keep_ids``): the teacher's forward with
    ``ids_keep`` keeps *its own* prefix tokens (CLS, and a DeiT distillation token if it has one)
    whatever the student's prefix is, and fuses the positional-embedding add into the gather.
    """
    from ..masking import maskedkd_patch_ids

    return maskedkd_patch_ids(cls_attn, keep)


class MaskedKD(SupervisedMethod):
    name = "maskedkd"
    Config = MaskedKDConfig
    manual_backward = False

    def __init__(self, cfg, num_classes: int, *, student: Optional[nn.Module] = None,
                 teacher: Optional[nn.Module] = None):
        super().__init__(cfg, num_classes, student if student is not None else build_classifier(cfg, num_classes))
        mcfg: MaskedKDConfig = self.mcfg
        if teacher is None:  # it sees the student's images as they are
            teacher = build_teacher(mcfg.teacher, cfg.model.patch_size, self.student.grid_size,
                                    num_classes=num_classes, img_size=cfg.model.img_size, method="MaskedKD")
        if tuple(teacher.grid_size) != tuple(self.student.grid_size):
            raise ValueError(
                f"the teacher's patch grid {tuple(teacher.grid_size)} differs from the student's "
                f"{tuple(self.student.grid_size)}: the student's CLS map cannot pick the teacher's tokens "
                "(use the same patch size and image size)"
            )
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher
        self.keep = resolve_keep(mcfg.teacher_keep, self.student.num_patches)
        self.flop_meter = FlopMeter(self.teacher) if mcfg.flop_counter == "hooks" else None
        self._full_flops_per_sample: Dict[tuple, int] = {}
        self._teacher_accuracy: Optional[Dict[str, float]] = None  # frozen teacher: measured once
        # Counted now for the configured image size, so a compiled step only looks the number up.
        in_chans = teacher.patch_embed.proj.in_channels
        self.full_teacher_flops_per_sample(torch.zeros(1, in_chans, *teacher.patch_embed.img_size))

    @classmethod
    def check_config(cls, cfg) -> None:
        patch = cfg.method.teacher.patch_size or cfg.model.patch_size
        if patch != cfg.model.patch_size:
            raise ValueError(f"method.teacher.patch_size={patch} differs from model.patch_size={cfg.model.patch_size}: "
                             "the student's CLS map picks the teacher's tokens, the two grids must match")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout/drop-path never run in the teacher
        return self

    def trainable_modules(self) -> Dict[str, nn.Module]:
        return {"student": self.student}

    # ------------------------------------------------------------------ teacher
    def _count(self, fn, *args, **kwargs):
        """``(fn(...), flops)`` with the configured counter."""
        if self.flop_meter is not None:
            with self.flop_meter.measure() as meter:
                out = fn(*args, **kwargs)
            return out, meter.flops
        return count_flops(fn, *args, **kwargs)

    @torch.no_grad()
    def full_teacher_flops_per_sample(self, images: torch.Tensor) -> int:
        """FLOPs of the teacher on one full image of this shape, counted once per image shape."""
        shape = tuple(images.shape[1:])
        if shape not in self._full_flops_per_sample:
            one = torch.zeros(1, *shape, device=images.device, dtype=images.dtype)
            _, self._full_flops_per_sample[shape] = self._count(self.teacher, one)
        return self._full_flops_per_sample[shape]

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor, ids_keep: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int]:
        """The teacher's logits on the kept tokens (all tokens when ``ids_keep`` is None) and the
        FLOPs that call spent."""
        return self._count(self.teacher, images, ids_keep=ids_keep)

    # ------------------------------------------------------------------ step
    def distillation_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        mcfg: MaskedKDConfig = self.mcfg
        if mcfg.distillation == "soft":
            return soft_distillation_loss(student_logits, teacher_logits, mcfg.tau)
        if mcfg.distillation == "hard":
            return hard_distillation_loss(student_logits, teacher_logits)
        return student_logits.new_zeros((), dtype=torch.float32)

    def training_step(self, batch, state: StepState) -> Tuple[torch.Tensor, Dict[str, float]]:
        mcfg: MaskedKDConfig = self.mcfg
        images, targets = self.mix(batch, state)
        N = self.student.num_patches
        with autocast_for(state.device, state.amp_dtype):
            masked_teacher = self.keep < N and mcfg.distillation != "none"
            by_attention = masked_teacher and mcfg.teacher_select == "attention"
            if by_attention:
                logits, cls_attn = self.student(images, return_cls_attn=True, attn_layer=mcfg.student_attn_layer)
            else:
                logits, cls_attn = self.student(images), None
            ids_keep = None
            if by_attention:
                ids_keep = select_teacher_tokens(cls_attn, self.keep)
            elif masked_teacher:
                from .. import ops

                # int(N * (1 - ratio)) == keep exactly (half a token of slack against rounding).
                ids_keep = ops.random_keep(images.shape[0], N, (N - self.keep - 0.5) / N,
                                           generator=state.generator, device=images.device).ids_keep
            if mcfg.distillation != "none":
                t_logits, t_flops = self.teacher_logits(images, ids_keep)
            else:
                t_logits, t_flops = None, 0
        loss_cls = classification_loss(logits, targets, mcfg.loss)
        if t_logits is not None:
            loss_kd = self.distillation_loss(logits, t_logits)
            loss = (1.0 - mcfg.alpha) * loss_cls + mcfg.alpha * loss_kd
        else:
            loss_kd = torch.zeros((), device=logits.device)
            loss = loss_cls
        full = self.full_teacher_flops_per_sample(images) * images.shape[0] if t_logits is not None else 0
        metrics = {
            # Detached tensors, not floats: no device sync per step (the driver converts when it logs).
            "loss_cls": loss_cls.detach(),
            "loss_kd": loss_kd.detach(),
            "acc": top1_accuracy(logits.detach(), targets),
            "teacher_tokens": float(self.keep if ids_keep is not None else N),
            "teacher_gflops": t_flops / 1e9,
            "teacher_gflops_full": full / 1e9,
            "teacher_flops_ratio": (t_flops / full) if full else 0.0,
        }
        return loss, metrics

    def evaluate_classifier(self, loader, device, amp_dtype=None) -> Dict[str, float]:
        """The student's val top-1/top-5, and the frozen teacher's (``teacher_val_*``), measured on the
        first call only: it cannot change, and the KD effect needs a teacher clearly stronger."""
        out = super().evaluate_classifier(loader, device, amp_dtype)
        if self._teacher_accuracy is None:
            self._teacher_accuracy = classifier_accuracy(self.teacher, loader, device, amp_dtype,
                                                         prefix="teacher_val_")
            self.teacher.eval()
        return {**out, **self._teacher_accuracy}


METHOD = MaskedKD
