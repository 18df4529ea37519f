"""``dino``: DINO self-distillation with masking of the student's global views.

DINO (Caron et al., 2021): a student ViT + projection head learns to match the centred,
sharpened output of an EMA teacher on other crops of the same image.  Teacher: the two global
crops; student: all crops (2 global + M local), run per resolution through ``MultiCropWrapper``.

Masking options (``student_mask``):

* ``random`` — "Rethinking Random Masking in Self-Distillation on ViT" (Seong & Han, 2025): random
  masking of the student's two *global* views only; the local views and the teacher's views stay
  clean, so the teacher's targets are never degraded.  ``student_mask_mode`` picks how hidden
  patches are removed: ``mask_token`` (replaced by the learnable mask token before the positional
  embedding, ``ops.apply_mask_token``) or ``drop`` (removed from the sequence, ``ids_keep``: the
  student then runs on fewer tokens, which also saves compute).
* ``attmask_high`` / ``attmask_low`` / ``attmask_hint`` — AttMask ("What to Hide from Your Students",
  Kakogeorgiou et al., ECCV 2022) applied to DINO: the teacher's last-layer CLS attention of each
  global view (returned by ``fastmask.ops.attention`` during the teacher's forward — no extra
  forward) chooses which tokens the student does not see; as in AttMask's code one ratio
  r ~ U(0.1, 0.5) per batch shared by both global views (``attmask_ratio_per``), each image masked with
  probability 0.5, hints reveal int(0.1 * r * N) of the most attended tokens (``attmask_hint_count``).
* ``none`` — plain DINO.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import ops
from .base import StepState
from .losses import DINOLoss
from .self_distillation import (SelfDistillation, SelfDistillationConfig, build_student_masks, check_attmask_options,
                                make_policy)

__all__ = ["DINO", "DINOConfig", "METHOD", "MASK_CHOICES", "MASK_MODES", "build_student_masks", "drop_keep_ids"]

MASK_CHOICES = ("none", "random", "attmask_high", "attmask_low", "attmask_hint")
MASK_MODES = ("mask_token", "drop")


@dataclass
class DINOConfig(SelfDistillationConfig):
    # head and loss: SelfDistillationConfig's defaults (DINO's ViT recipe)
    # masking of the student's global views
    student_mask: str = "random"  # none | random | attmask_high | attmask_low | attmask_hint
    student_mask_mode: str = "mask_token"  # mask_token | drop (drop: random masking only)
    student_mask_ratio: float = 0.3  # random masking: fraction of patches hidden in each global view
    attmask_ratio: Tuple[float, float] = (0.1, 0.5)  # AttMask: per-sample ratio ~ U(a, b)
    attmask_prob: float = 0.5  # AttMask: probability that an image is masked at all
    attmask_show_max: float = 0.1  # AttMask-Hint: reveal among the top show_max fraction
    attmask_show_ratio: Tuple[float, float] = (0.01, 0.05)  # AttMask-Hint, hint_count=independent: ~ U(a, b)
    # AttMask's official code draws one ratio per batch, shared by both global views, and reveals
    # int(show_max * ratio * N) hints (main_attmask.py train_one_epoch, attmask.py AttMask);
    # "sample" / "independent" are fastmask's per-image variants.
    attmask_ratio_per: str = "batch"  # batch | sample
    attmask_hint_count: str = "tied"  # tied | independent

    def __post_init__(self):
        if self.student_mask not in MASK_CHOICES:
            raise ValueError(f"student_mask must be one of {MASK_CHOICES}, got {self.student_mask!r}")
        if self.student_mask_mode not in MASK_MODES:
            raise ValueError(f"student_mask_mode must be one of {MASK_MODES}, got {self.student_mask_mode!r}")
        if not 0.0 <= self.student_mask_ratio < 1.0:
            raise ValueError(f"student_mask_ratio must be in [0, 1), got {self.student_mask_ratio}")
        if self.student_mask_mode == "drop" and self.student_mask.startswith("attmask"):
            raise ValueError("student_mask_mode=drop needs a fixed number of kept tokens per image; "
                             "use it with student_mask=random (AttMask uses per-sample ratios: mask_token)")
        lo, hi = self.attmask_ratio
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"attmask_ratio must satisfy 0 <= a <= b < 1, got {self.attmask_ratio}")
        if not 0.0 <= self.attmask_prob <= 1.0:
            raise ValueError(f"attmask_prob must be in [0, 1], got {self.attmask_prob}")
        super().__post_init__()
        check_attmask_options(self.attmask_ratio_per, self.attmask_hint_count)

    def policy_kwargs(self) -> dict:
        """``build_mask_policy``'s options for ``student_mask``."""
        if self.student_mask == "random":
            return dict(ratio=self.student_mask_ratio)
        kw = dict(ratio=tuple(self.attmask_ratio), mask_prob=self.attmask_prob, ratio_per=self.attmask_ratio_per)
        if self.student_mask == "attmask_hint":
            kw.update(show_max=self.attmask_show_max, show_ratio=tuple(self.attmask_show_ratio),
                      hint_count=self.attmask_hint_count)
        return kw


def drop_keep_ids(global_crops: List[torch.Tensor], backbone, ratio: float, *,
                  generator: Optional[torch.Generator] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Drop mode: per global crop, the kept patch ids [B, K] (ascending, ``K = int(N * (1 - ratio))``)
    and the mask [B, N] they leave, from one ``ops.random_keep`` over the crops' concatenated batch
    (the ids and the mask come out of the same op: no conversion, no host sync)."""
    grids = {backbone.grid_for(tuple(c.shape[-2:])) for c in global_crops}
    if len(grids) != 1:
        raise ValueError(f"student_mask_mode=drop needs global crops of one size, got grids {sorted(grids)}")
    (h, w), = grids
    sizes = [c.shape[0] for c in global_crops]
    kept = ops.random_keep(sum(sizes), h * w, ratio, generator=generator, device=global_crops[0].device)
    return list(kept.ids_keep.split(sizes)), list(kept.mask.split(sizes))


class DINO(SelfDistillation):
    name = "dino"
    Config = DINOConfig

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        from ..models import DINOHead

        m = self.mcfg
        self.build_student_teacher(cfg, DINOHead, m.out_dim)
        self.loss_fn = DINOLoss(m.out_dim, **m.loss_kwargs())
        if m.student_mask != "none":
            self.policy = make_policy(m.student_mask, **m.policy_kwargs())
        self.policy_ranks_by_teacher = m.student_mask.startswith("attmask")

    def training_step(self, batch, state: StepState):
        crops, _ = batch
        m = self.mcfg
        globals_, locals_ = self.split_crops(crops)
        t_out = self.teacher_forward(globals_)
        masks = ids_keep = global_masks = None
        if m.student_mask_mode == "drop" and self.policy is not None:
            global_ids, global_masks = drop_keep_ids(globals_, self.student.backbone, m.student_mask_ratio,
                                                     generator=state.generator)
            ids_keep = global_ids + [None] * len(locals_)
        elif self.policy is not None:
            global_masks = self.student_masks(globals_, t_out, state)
            masks = list(global_masks) + [None] * len(locals_)
        s_out = self.student(globals_ + locals_, masks=masks, ids_keep=ids_keep, head_on_cls=not m.fuse_last_layer)
        temp = self.teacher_temp(state)
        loss = self.loss_fn(self.cls_for_loss(s_out.cls), t_out.cls, temp)
        metrics = {"teacher_temp": temp}
        if global_masks is not None:
            metrics["mask_ratio"] = torch.stack([gm.float().mean() for gm in global_masks]).mean()
        return loss, metrics


METHOD = DINO
