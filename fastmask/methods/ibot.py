"""``ibot``: iBOT (Zhou et al., ICLR 2022) with block, random or AttMask masking.

The student sees the two global views with some patches replaced by the mask token (plus the
clean local views); the EMA teacher sees the clean global views.  Loss = DINO's loss on the CLS
token over cross-view pairs + the masked-image-modelling loss on the patch tokens of the same view
at the masked positions, both through one shared ``IBOTHead`` with separate teacher centers.

Masking (``mask``): ``block`` (iBOT's default, BEiT-style blocks), ``random``, or AttMask ("What to
Hide from Your Students", ECCV 2022) ``attmask_high`` / ``attmask_low`` / ``attmask_hint``: the
tokens are ranked by the teacher's last-layer CLS attention on the same global view.  The map comes
out of ``fastmask.ops.attention`` inside the teacher's forward (``return_cls_attn``): the teacher runs
first and there is no extra forward.  Every policy draws a ratio r ~ U(mask_ratio) (once per batch
for AttMask, per image for block/random: ``ratio_per``) and masks each image with probability
``mask_prob`` (0.5).

Only the masked tokens enter the patch loss (~15% of them at the defaults), so the student's patch
head runs on those alone (``patch_head``): the same loss and gradients for ~1/6 of the head's
compute and memory.  A head with BatchNorm normalises over the tokens it sees, so there it runs on
all of them (``auto``).  The teacher's head still sees every token: its patch centre is the mean
over all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from .base import StepState
from .losses import IBOTLoss, gather_rows, masked_token_ids
from .schedules import teacher_temp_at
from .self_distillation import SelfDistillation, SelfDistillationConfig, check_attmask_options, make_policy

__all__ = ["IBOT", "IBOTConfig", "METHOD", "MASK_POLICIES", "PATCH_HEADS"]

MASK_POLICIES = ("block", "random", "attmask_high", "attmask_low", "attmask_hint")
PATCH_HEADS = ("auto", "masked", "all")


@dataclass
class IBOTConfig(SelfDistillationConfig):
    # shared head (iBOT ViT-S/16 recipe; the other head and CLS-loss options: SelfDistillationConfig)
    out_dim: int = 8192
    patch_out_dim: int = 8192
    shared_head: bool = True
    norm_last_layer: bool = False
    # patch loss
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    center_momentum_patch: float = 0.9
    lambda_cls: float = 1.0
    lambda_patch: float = 1.0
    # student patch head on: masked = the masked tokens only (one device sync for their count);
    # all = every token (the official code); auto = masked unless the head has BatchNorm
    patch_head: str = "auto"
    # fuse_last_layer (SelfDistillationConfig) needs the masked patch head
    # masking of the student's global views
    mask: str = "block"  # block | random | attmask_high | attmask_low | attmask_hint
    mask_ratio: Tuple[float, float] = (0.1, 0.5)  # per-sample ratio ~ U(a, b) (iBOT: 0.3 +- 0.2)
    mask_prob: float = 0.5  # probability that an image is masked at all
    mask_start_epoch: int = 0  # no masking before this epoch (iBOT's pred_start_epoch)
    block_min_patches: int = 16  # block-wise masking: smallest block
    block_aspect: Tuple[float, float] = (0.3, 1 / 0.3)
    show_max: float = 0.1  # AttMask-Hint
    show_ratio: Tuple[float, float] = (0.01, 0.05)  # AttMask-Hint with hint_count=independent
    # "auto": AttMask policies draw one ratio per batch (main_attmask.py), block/random one per image
    # and view (iBOT's ImageFolderMask); "batch" / "sample" force one.
    ratio_per: str = "auto"
    hint_count: str = "tied"  # AttMask-Hint: int(show_max * ratio * N) revealed (attmask.py) | independent
    # iBOTLoss: the patch temperature stays at its warm-up value until pred_start_epoch
    # (mask_start_epoch here) and warms up from there; False: from epoch 0 like the CLS temperature.
    patch_temp_from_mask_start: bool = True

    def __post_init__(self):
        if self.mask not in MASK_POLICIES:
            raise ValueError(f"mask must be one of {MASK_POLICIES}, got {self.mask!r}")
        lo, hi = self.mask_ratio
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"mask_ratio must satisfy 0 <= a <= b < 1, got {self.mask_ratio}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise ValueError(f"shared_head needs patch_out_dim == out_dim, got {self.patch_out_dim} != {self.out_dim}")
        for name in ("warmup_teacher_patch_temp", "teacher_patch_temp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.patch_head not in PATCH_HEADS:
            raise ValueError(f"patch_head must be one of {PATCH_HEADS}, got {self.patch_head!r}")
        if self.fuse_last_layer and (self.patch_head == "all" or self.head_use_bn):
            raise ValueError("fuse_last_layer needs the masked patch head (patch_head auto/masked, no head BatchNorm)")
        if self.patch_head == "masked" and self.head_use_bn:
            raise ValueError("patch_head=masked with head_use_bn: BatchNorm's statistics over the masked tokens "
                             "differ from those over all tokens; use patch_head=auto or all")
        super().__post_init__()
        check_attmask_options(self.ratio_per, self.hint_count)

    def policy_ratio_per(self) -> str:
        if self.ratio_per != "auto":
            return self.ratio_per
        return "batch" if self.mask.startswith("attmask") else "sample"

    def policy_kwargs(self) -> dict:
        """``build_mask_policy``'s options for ``mask``."""
        kw = dict(ratio=tuple(self.mask_ratio), mask_prob=self.mask_prob, ratio_per=self.policy_ratio_per())
        if self.mask == "block":
            kw.update(min_num_patches=self.block_min_patches, aspect_ratio=tuple(self.block_aspect))
        elif self.mask == "attmask_hint":
            kw.update(show_max=self.show_max, show_ratio=tuple(self.show_ratio), hint_count=self.hint_count)
        return kw


class IBOT(SelfDistillation):
    name = "ibot"
    Config = IBOTConfig

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        from ..models import IBOTHead

        m = self.mcfg
        self.build_student_teacher(cfg, IBOTHead, m.out_dim, m.patch_out_dim, shared_head=m.shared_head)
        self.loss_fn = IBOTLoss(m.out_dim, m.patch_out_dim, center_momentum_patch=m.center_momentum_patch,
                                lambda_cls=m.lambda_cls, lambda_patch=m.lambda_patch, **m.loss_kwargs())
        self.masked_patch_head = m.patch_head == "masked" or (m.patch_head == "auto" and not m.head_use_bn)
        self.policy = make_policy(m.mask, **m.policy_kwargs())
        self.policy_ranks_by_teacher = m.mask.startswith("attmask")

    def temperatures(self, state: StepState):
        """The teacher's CLS and patch temperatures at this epoch."""
        m = self.mcfg
        start = m.mask_start_epoch if m.patch_temp_from_mask_start else 0
        return (self.teacher_temp(state),
                teacher_temp_at(state.epoch, m.warmup_teacher_patch_temp, m.teacher_patch_temp,
                                m.warmup_teacher_temp_epochs, rule=m.teacher_temp_warmup, start_epoch=start))

    def training_step(self, batch, state: StepState):
        crops, _ = batch
        m = self.mcfg
        globals_, locals_ = self.split_crops(crops)
        t_out = self.teacher_forward(globals_, return_patch=True)
        backbone = self.student.backbone
        if state.epoch >= m.mask_start_epoch:
            masks = self.student_masks(globals_, t_out, state)
        else:
            # before mask_start_epoch: no patch is hidden (the patch loss is then 0)
            masks = [torch.zeros(g.shape[0], math.prod(backbone.grid_for(tuple(g.shape[-2:]))),
                                 dtype=torch.bool, device=g.device) for g in globals_]
        fuse = m.fuse_last_layer
        s_glob = self.student(globals_, masks=masks, return_patch=True, head_on_patch=not self.masked_patch_head,
                              head_on_cls=not fuse)
        s_cls = s_glob.cls
        if locals_:
            # Local views: clean, CLS only (no patch loss on them, as in iBOT).
            s_cls = torch.cat([s_cls, self.student(locals_, head_on_cls=not fuse).cls])
        s_cls = self.cls_for_loss(s_cls)
        temp, patch_temp = self.temperatures(state)
        all_masks = torch.cat(masks)
        s_patch, masked_ids = torch.cat(s_glob.patch), None
        if self.masked_patch_head:
            # The patch loss reads the masked tokens only: the head runs on those [M, D] alone.  A
            # compiled step keeps static shapes instead (M is data-dependent): head on every token,
            # the loss weighted by the mask.
            if not torch.compiler.is_compiling():
                masked_ids = masked_token_ids(all_masks)
                s_patch = gather_rows(s_patch, masked_ids)
            head = self.student.head
            if fuse:
                layer = head.last_layer if head.last_layer2 is None else head.last_layer2
                s_patch = (head.project(s_patch), layer.weight)
            else:
                s_patch = head.forward_patch(s_patch)
        loss, parts = self.loss_fn(s_cls, s_patch, t_out.cls, torch.cat(t_out.patch),
                                   all_masks, temp, patch_temp, masked_ids=masked_ids)
        parts["mask_ratio"] = all_masks.float().mean()
        parts["teacher_temp"] = temp
        return loss, parts


METHOD = IBOT
