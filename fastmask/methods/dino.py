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
from .base import SelfDistillation, StepState
from .losses import DINOLoss
from .schedules import teacher_temp_at

__all__ = ["DINO", "DINOConfig", "METHOD", "MASK_CHOICES", "MASK_MODES", "build_student_masks", "drop_keep_ids"]

MASK_CHOICES = ("none", "random", "attmask_high", "attmask_low", "attmask_hint")
MASK_MODES = ("mask_token", "drop")


@dataclass
class DINOConfig:
    # head (DINO's ViT recipe)
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_use_bn: bool = False  # BatchNorm in the head's MLP (DINO: off for ViTs)
    norm_last_layer: bool = True
    # loss
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    num_global_crops: int = 2
    fused_loss: bool = True  # fastmask.ops.sdist_loss: no [rows, K] float32 tensor saved (same loss)
    fuse_last_layer: bool = False  # the loss applies the head's last layer slice by slice: no student logits
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
    # Teacher-temperature warm-up: "linspace" as DINOLoss (final value at epoch warmup - 1) or "linear"
    teacher_temp_warmup: str = "linspace"

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
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {self.center_momentum}")
        if self.num_global_crops < 1:
            raise ValueError(f"num_global_crops must be >= 1, got {self.num_global_crops}")
        if self.warmup_teacher_temp_epochs < 0:
            raise ValueError(f"warmup_teacher_temp_epochs must be >= 0, got {self.warmup_teacher_temp_epochs}")
        check_attmask_options(self.attmask_ratio_per, self.attmask_hint_count, self.teacher_temp_warmup)


def check_attmask_options(ratio_per: str, hint_count: str, temp_warmup: str) -> None:
    from ..masking.policies import HINT_COUNTS
    from ..masking.ratios import RATIO_PER
    from .schedules import TEMP_WARMUPS

    for name, value, choices in (("ratio_per", ratio_per, RATIO_PER + ("auto",)),
                                 ("hint_count", hint_count, HINT_COUNTS),
                                 ("teacher_temp_warmup", temp_warmup, TEMP_WARMUPS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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


def _policy_kwargs(mcfg, kind: str):
    if kind == "random":
        return dict(ratio=mcfg.student_mask_ratio)
    mode = kind.split("_", 1)[1]
    kw = dict(ratio=tuple(mcfg.attmask_ratio), mask_prob=mcfg.attmask_prob, ratio_per=mcfg.attmask_ratio_per)
    if mode == "hint":
        kw.update(show_max=mcfg.attmask_show_max, show_ratio=tuple(mcfg.attmask_show_ratio),
                  hint_count=mcfg.attmask_hint_count)
    return kw


def make_policy(name: str, **kw):
    """``fastmask.masking.build_mask_policy`` (imported lazily: DINO without masks never needs it)."""
    from ..masking import build_mask_policy

    return build_mask_policy(name, **kw)


def build_student_masks(policy, global_crops: List[torch.Tensor], backbone, *,
                        cls_attn: Optional[List[torch.Tensor]] = None,
                        generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """One bool mask [B, N] per global crop (True = hidden), from ``policy``; with ``cls_attn`` (the
    teacher's map per global crop) the policy ranks tokens by it (AttMask).

    Global crops of one grid are masked in one call over their concatenation, as AttMask's
    ``train_one_epoch`` masks the teacher attention of both views at once: one kernel launch, and a
    per-batch ratio (``ratio_per="batch"``) is shared by both views.
    """
    grids = [backbone.grid_for(tuple(crop.shape[-2:])) for crop in global_crops]
    if len(global_crops) > 1 and all(g == grids[0] for g in grids):
        sizes = [crop.shape[0] for crop in global_crops]
        attn = None if cls_attn is None else torch.cat(list(cls_attn))
        mask = policy(sum(sizes), grids[0], cls_attn=attn, generator=generator, device=global_crops[0].device)
        return list(mask.split(sizes))
    masks = []
    for i, crop in enumerate(global_crops):
        grid = backbone.grid_for(tuple(crop.shape[-2:]))
        masks.append(policy(crop.shape[0], grid, cls_attn=None if cls_attn is None else cls_attn[i],
                            generator=generator, device=crop.device))
    return masks


class DINO(SelfDistillation):
    name = "dino"
    Config = DINOConfig

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        from ..models import DINOHead

        m = self.mcfg
        self.build_student_teacher(cfg, lambda dim: DINOHead(
            dim, m.out_dim, use_bn=m.head_use_bn, norm_last_layer=m.norm_last_layer, nlayers=m.head_nlayers,
            hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim))
        self.loss_fn = DINOLoss(m.out_dim, n_global=m.num_global_crops, student_temp=m.student_temp,
                                center_momentum=m.center_momentum, fused=m.fused_loss)
        self.policy = None
        if m.student_mask != "none":
            self.policy = make_policy(m.student_mask, **_policy_kwargs(m, m.student_mask))

    def teacher_temp(self, state: StepState) -> float:
        m = self.mcfg
        return teacher_temp_at(state.epoch, m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs,
                               rule=m.teacher_temp_warmup)

    def training_step(self, batch, state: StepState):
        crops, _ = batch
        m = self.mcfg
        globals_, locals_ = self.split_crops(crops)
        attmask = m.student_mask.startswith("attmask")
        with torch.no_grad():
            # The teacher sees only the clean global views; with AttMask its last block also hands
            # back the CLS map, which then decides what the student may not see.
            t_out = self.teacher(globals_, return_cls_attn=attmask)
        masks = ids_keep = None
        mask_frac = None
        if m.student_mask_mode == "drop" and self.policy is not None:
            global_ids, global_masks = drop_keep_ids(globals_, self.student.backbone, m.student_mask_ratio,
                                                     generator=state.generator)
            ids_keep = global_ids + [None] * len(locals_)
            mask_frac = torch.stack([gm.float().mean() for gm in global_masks]).mean()
        elif self.policy is not None:
            global_masks = build_student_masks(self.policy, globals_, self.student.backbone,
                                               cls_attn=t_out.cls_attn if attmask else None,
                                               generator=state.generator)
            mask_frac = torch.stack([gm.float().mean() for gm in global_masks]).mean()
            masks = list(global_masks) + [None] * len(locals_)
        s_out = self.student(globals_ + locals_, masks=masks, ids_keep=ids_keep, head_on_cls=not m.fuse_last_layer)
        temp = self.teacher_temp(state)
        s_cls = s_out.cls
        if m.fuse_last_layer:
            head = self.student.head
            s_cls = (head.project(s_cls), head.last_layer.weight)
        loss = self.loss_fn(s_cls, t_out.cls, temp)
        metrics = {"teacher_temp": temp}
        if mask_frac is not None:
            metrics["mask_ratio"] = mask_frac
        return loss, metrics


METHOD = DINO
