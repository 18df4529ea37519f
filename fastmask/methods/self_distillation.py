"""What DINO and iBOT share: the options of a projection head and of a teacher-centred loss, the
student/EMA-teacher pair on multi-crop batches, and the masking of the student's global views.

* :class:`SelfDistillationConfig` - head, loss and teacher-temperature options (the methods'
  ``Config`` dataclasses extend it and set their papers' defaults).
* :class:`SelfDistillation` - a student and an EMA teacher of one architecture, each a
  ``MultiCropWrapper`` (backbone + projection head), with the per-step plumbing both methods run:
  crops split into global and local views, the teacher's forward on the clean global views (with its
  CLS map when a mask policy ranks tokens by it), the student's masks, the teacher temperature and
  the head's last layer fused into the loss.
* :func:`build_student_masks` - one mask per global view from a ``fastmask.masking`` policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .base import Method, StepState, build_backbone, ema_update_
from .schedules import TEMP_WARMUPS, teacher_temp_at

__all__ = ["SelfDistillation", "SelfDistillationConfig", "build_student_masks", "check_attmask_options",
           "make_policy"]


@dataclass
class SelfDistillationConfig:
    # projection head (DINO's ViT recipe)
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_use_bn: bool = False  # BatchNorm in the head's MLP (DINO, iBOT: off for ViTs)
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
    # Teacher-temperature warm-up: "linspace" as DINOLoss/iBOTLoss (final value at epoch warmup - 1)
    # or "linear" (fastmask's earlier ramp)
    teacher_temp_warmup: str = "linspace"

    def __post_init__(self):
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1), got {self.center_momentum}")
        if self.num_global_crops < 1:
            raise ValueError(f"num_global_crops must be >= 1, got {self.num_global_crops}")
        if self.warmup_teacher_temp_epochs < 0:
            raise ValueError(f"warmup_teacher_temp_epochs must be >= 0, got {self.warmup_teacher_temp_epochs}")
        if self.teacher_temp_warmup not in TEMP_WARMUPS:
            raise ValueError(f"teacher_temp_warmup must be one of {TEMP_WARMUPS}, got {self.teacher_temp_warmup!r}")

    def loss_kwargs(self) -> dict:
        """The keyword arguments of ``DINOLoss`` / ``IBOTLoss``'s CLS term these options set."""
        return dict(n_global=self.num_global_crops, student_temp=self.student_temp,
                    center_momentum=self.center_momentum, fused=self.fused_loss)

    def head_kwargs(self) -> dict:
        """The keyword arguments of ``DINOHead`` / ``IBOTHead`` these options set."""
        return dict(use_bn=self.head_use_bn, norm_last_layer=self.norm_last_layer, nlayers=self.head_nlayers,
                    hidden_dim=self.head_hidden_dim, bottleneck_dim=self.head_bottleneck_dim)


def check_attmask_options(ratio_per: str, hint_count: str) -> None:
    from ..masking.policies import HINT_COUNTS
    from ..masking.ratios import RATIO_PER

    for name, value, choices in (("ratio_per", ratio_per, RATIO_PER + ("auto",)),
                                 ("hint_count", hint_count, HINT_COUNTS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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


class SelfDistillation(Method):
    """A student and an EMA teacher of the same architecture, each a ``MultiCropWrapper`` (backbone +
    projection head), trained on multi-crop batches: what DINO and iBOT share.

    Subclasses call :meth:`build_student_teacher` with their head class, set ``policy`` (a mask policy
    or None) and ``policy_ranks_by_teacher`` (AttMask), and implement ``training_step``; the teacher
    starts as a copy of the student, takes no gradients, follows the student by EMA after every
    optimizer step and is the network evaluated (the EMA is the better feature extractor).  Their
    config is a :class:`SelfDistillationConfig`.
    """

    pipeline = "multicrop"

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.policy = None  # the student's mask policy (fastmask.masking), or None: no masking
        self.policy_ranks_by_teacher = False  # the policy ranks tokens by the teacher's CLS map (AttMask)

    def build_student_teacher(self, cfg, head_cls: Callable[..., nn.Module], *head_args, **head_kwargs) -> None:
        """Student and teacher: ``cfg.model``'s backbone + ``head_cls(width, *head_args, **head_kwargs,
        **cfg.method.head_kwargs())``."""
        from ..models import MultiCropWrapper

        student_backbone = build_backbone(cfg)
        teacher_backbone = build_backbone(cfg, drop_path_rate=0.0)  # the EMA teacher never drops paths
        dim = student_backbone.embed_dim
        head_kwargs.update(self.mcfg.head_kwargs())
        self.student = MultiCropWrapper(student_backbone, head_cls(dim, *head_args, **head_kwargs))
        self.teacher = MultiCropWrapper(teacher_backbone, head_cls(dim, *head_args, **head_kwargs))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @classmethod
    def check_config(cls, cfg) -> None:
        m = cfg.method
        local = getattr(cfg.data, "local_size", None)
        if local is not None and getattr(cfg.data, "num_local_crops", 0) and local % cfg.model.patch_size:
            raise ValueError(f"data.local_size={local} is not divisible by model.patch_size={cfg.model.patch_size}")
        from ..data.augment import NUM_GLOBAL_CROPS

        if m.num_global_crops != NUM_GLOBAL_CROPS:
            raise ValueError(f"method.num_global_crops={m.num_global_crops}, but the multi-crop loaders emit "
                             f"{NUM_GLOBAL_CROPS} global views per image")

    # ------------------------------------------------------------------ step pieces
    def split_crops(self, crops) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(global views, local views) of a multi-crop batch, globals first as the loaders emit them."""
        n_global = self.mcfg.num_global_crops
        if len(crops) < n_global:
            raise ValueError(f"{self.name} needs at least {n_global} crops per image, the loader gave {len(crops)}")
        return list(crops[:n_global]), list(crops[n_global:])

    @torch.no_grad()
    def teacher_forward(self, global_crops: List[torch.Tensor], **kwargs):
        """The teacher on the clean global views only; for AttMask its last block also hands back the
        CLS map (same forward), which then decides what the student may not see."""
        return self.teacher(global_crops, return_cls_attn=self.policy_ranks_by_teacher, **kwargs)

    def student_masks(self, global_crops: List[torch.Tensor], teacher_out, state: StepState) -> List[torch.Tensor]:
        """``policy``'s mask [B, N] per global view (ranked by the teacher's CLS maps for AttMask)."""
        return build_student_masks(self.policy, global_crops, self.student.backbone,
                                   cls_attn=teacher_out.cls_attn if self.policy_ranks_by_teacher else None,
                                   generator=state.generator)

    def teacher_temp(self, state: StepState) -> float:
        """The teacher's CLS temperature at this epoch (warm-up ``teacher_temp_warmup``)."""
        m = self.mcfg
        return teacher_temp_at(state.epoch, m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs,
                               rule=m.teacher_temp_warmup)

    def cls_for_loss(self, student_cls: torch.Tensor):
        """The student's CLS output as the loss takes it: the head's logits, or with ``fuse_last_layer``
        ``(bottleneck z, last-layer weight)`` (the loss applies the layer itself)."""
        if not self.mcfg.fuse_last_layer:
            return student_cls
        head = self.student.head
        return head.project(student_cls), head.last_layer.weight

    # ------------------------------------------------------------------ driver hooks
    def cancel_last_layer_grads(self, state: StepState) -> None:
        # iBOT's unshared head has a second last layer for the patch tokens.
        head = self.student.head
        for layer in (getattr(head, "last_layer", None), getattr(head, "last_layer2", None)):
            if layer is not None:
                for p in layer.parameters():
                    p.grad = None

    @torch.no_grad()
    def on_after_optimizer_step(self, state: StepState) -> None:
        ema_update_(self.teacher, self.student, state.teacher_momentum)

    def eval_backbone(self) -> nn.Module:
        return self.teacher.backbone
