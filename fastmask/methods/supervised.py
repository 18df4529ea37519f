"""Pieces shared by the supervised methods (MaskSub, MaskedKD): targets, losses, mixing.

* :class:`SupervisedConfig` - the options every supervised recipe has (loss kind, label smoothing,
  Mixup/CutMix as in timm/DeiT); the methods' own ``Config`` dataclasses extend it.
* :class:`TargetMixer` - turns ``(images, labels)`` into ``(images, soft targets [B, C])`` with
  ``timm.data.Mixup`` (or plain smoothed one-hot targets when mixing is off).  timm draws its
  mixing parameters from numpy's global RNG; we seed that RNG from the step's torch generator for
  the duration of the call and restore it afterwards, so a resumed run mixes exactly as before.
* :class:`SupervisedMethod` - the method base of both: a classifier ``student``, its targets mixed by a
  ``TargetMixer`` (ahead of a compiled step in ``prepare_batch``) and its validation accuracy.
* :func:`build_classifier` (the student ViT from ``cfg.model``) and :func:`autocast_for`.
* losses: :func:`classification_loss` (soft-target CE or BCE), :func:`self_distillation_loss`
  (MaskSub's ``CE(sub, softmax(main).detach())``), :func:`soft_distillation_loss` and
  :func:`hard_distillation_loss` (DeiT / MaskedKD knowledge distillation).

All losses are computed in float32 whatever the logits' dtype (AMP autocast leaves the head's
output in half precision; log-softmax over 1000 classes in fp16 loses the tail).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..philox import draw_seed
from .base import Method, StepState, build_backbone

__all__ = [
    "LOSS_KINDS",
    "SupervisedConfig",
    "SupervisedMethod",
    "TargetMixer",
    "autocast_for",
    "build_classifier",
    "check_supervised_config",
    "classifier_accuracy",
    "classification_loss",
    "hard_distillation_loss",
    "self_distillation_loss",
    "soft_distillation_loss",
    "top1_accuracy",
]

LOSS_KINDS = ("ce", "bce")


@dataclass
class SupervisedConfig:
    """Options shared by supervised recipes (defaults: DeiT's ImageNet recipe)."""

    loss: str = "ce"  # "ce" (soft-target cross-entropy) or "bce" (DeiT-III binary cross-entropy)
    label_smoothing: float = 0.1
    # DeiT-III's BCE recipe turns the mixed targets into hard multi-label targets (target > 0 -> 1).
    bce_binarize_targets: bool = True
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    cutmix_minmax: Optional[Tuple[float, float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # "batch", "pair" or "elem" (timm.data.Mixup's modes)

    def __post_init__(self):
        check_supervised_config(self)


def check_supervised_config(cfg: SupervisedConfig) -> None:
    """Raise ValueError for options that cannot work (called before training starts)."""
    if cfg.loss not in LOSS_KINDS:
        raise ValueError(f"method.loss must be one of {LOSS_KINDS}, got {cfg.loss!r}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"method.label_smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    if cfg.mixup_alpha < 0 or cfg.cutmix_alpha < 0:
        raise ValueError(f"method.mixup_alpha and method.cutmix_alpha must be >= 0, got {cfg.mixup_alpha}, {cfg.cutmix_alpha}")
    if not 0.0 <= cfg.mixup_prob <= 1.0 or not 0.0 <= cfg.mixup_switch_prob <= 1.0:
        raise ValueError("method.mixup_prob and method.mixup_switch_prob must lie in [0, 1]")
    if cfg.mixup_mode not in ("batch", "pair", "elem"):
        raise ValueError(f"method.mixup_mode must be 'batch', 'pair' or 'elem', got {cfg.mixup_mode!r}")
    if cfg.cutmix_minmax is not None and len(cfg.cutmix_minmax) != 2:
        raise ValueError(f"method.cutmix_minmax must be null or [min, max], got {cfg.cutmix_minmax!r}")


def _mixing_enabled(cfg: SupervisedConfig) -> bool:
    return cfg.mixup_prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.cutmix_minmax is not None)


class TargetMixer:
    """``(images, labels) -> (images, targets [B, C] float32)``: Mixup/CutMix + label smoothing.

    Labels may already be soft ([B, C] float), in which case they pass through unmixed.
    """

    def __init__(self, cfg: SupervisedConfig, num_classes: int):
        self.num_classes = int(num_classes)
        self.smoothing = float(cfg.label_smoothing)
        self.binarize = cfg.loss == "bce" and cfg.bce_binarize_targets
        self.mixup = None
        if _mixing_enabled(cfg):
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=cfg.mixup_alpha,
                cutmix_alpha=cfg.cutmix_alpha,
                cutmix_minmax=list(cfg.cutmix_minmax) if cfg.cutmix_minmax is not None else None,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                mode=cfg.mixup_mode,
                label_smoothing=self.smoothing,
                num_classes=self.num_classes,
            )

    def smooth_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=labels.device, dtype=torch.float32)
        return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - self.smoothing + off)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if labels.dim() == 2:  # already soft targets (e.g. mixed by the loader)
            if labels.shape[1] != self.num_classes:
                raise ValueError(f"soft labels must have {self.num_classes} columns, got {tuple(labels.shape)}")
            targets = labels.float()
        elif labels.dim() != 1:
            raise ValueError(f"labels must be [B] class indices or [B, C] soft targets, got {tuple(labels.shape)}")
        elif self.mixup is not None:
            if images.shape[0] % 2 != 0:
                raise ValueError(
                    f"Mixup/CutMix needs an even batch size, got {images.shape[0]} (drop the last batch, "
                    "or set method.mixup_alpha=0 method.cutmix_alpha=0)"
                )
            # timm mixes in place: work on a copy so the caller's batch stays what the loader gave.
            images = images.clone()
            seed = draw_seed(generator)  # works with CPU and CUDA generators alike
            saved = np.random.get_state()
            np.random.seed(seed)
            try:
                images, targets = self.mixup(images, labels.long())
            finally:
                np.random.set_state(saved)
            targets = targets.float()
        else:
            targets = self.smooth_one_hot(labels)
        if self.binarize:
            # Every class present in the (mixed) image becomes a positive; the smoothing floor
            # (smoothing / C) marks the absent ones.  With smoothing 0 this is DeiT-III's gt(0).
            floor = self.smoothing / self.num_classes
            targets = (targets > floor + 1e-6).float()
        return images, targets


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Loss of ``logits [B, C]`` against soft ``targets [B, C]``.

    ``ce``: ``mean_b sum_c -t log softmax(z)``; ``bce``: mean over all B*C of binary cross-entropy
    with logits (DeiT-III).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have one shape [B, C]")
    z = logits.float()
    t = targets.float()
    if kind == "ce":
        return torch.sum(-t * F.log_softmax(z, dim=-1), dim=-1).mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(z, t)
    raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")


def self_distillation_loss(sub_logits: torch.Tensor, main_logits: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """MaskSub's sub-branch loss: the main branch's detached prediction is the target.

    ``ce``: ``CE(sub, softmax(main))``; ``bce``: ``BCE(sub, sigmoid(main))``.
    """
    main = main_logits.detach().float()
    targets = torch.softmax(main, dim=-1) if kind == "ce" else torch.sigmoid(main)
    return classification_loss(sub_logits, targets, kind)


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(softmax(t/tau) || softmax(s/tau))`` averaged over the batch (DeiT/MaskedKD soft KD)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (tau * tau)


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's arg-max class (DeiT hard distillation)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))


def autocast_for(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Autocast to ``amp_dtype`` on ``device`` (a no-op context when None).  The driver already
    runs ``training_step`` under autocast; this keeps the methods right when called directly."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)


def build_classifier(cfg, num_classes: int, *, layer_scale_init: Optional[float] = None) -> nn.Module:
    """The ViT classifier described by ``cfg.model`` (``fastmask.methods.base.build_backbone``),
    with DeiT-III's LayerScale when ``layer_scale_init`` is given."""
    extra = {"init_values": float(layer_scale_init)} if layer_scale_init else {}
    return build_backbone(cfg, num_classes=num_classes, **extra)


@torch.no_grad()
def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 agreement (percent, a 0-dim tensor: no device sync) of ``logits`` with the arg-max of
    (possibly mixed) ``targets``."""
    return (logits.argmax(-1) == targets.argmax(-1)).float().mean() * 100.0


@torch.no_grad()
def classifier_accuracy(model: nn.Module, loader, device: torch.device,
                        amp_dtype: Optional[torch.dtype] = None, prefix: str = "val_") -> dict:
    """``{prefix + "top1", prefix + "top5"}`` (percent; top-5 only with >= 5 classes) of ``model``'s
    logits on every batch of ``loader`` (``(images, labels)`` or a dict with ``images``/``labels``),
    in eval mode (restored afterwards).  The counts are summed on the device and read once."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = None
    n, num_classes = 0, 0
    try:
        for batch in loader:
            images, labels = (batch["images"], batch["labels"]) if isinstance(batch, dict) else batch[:2]
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device).long()
            with autocast_for(device, amp_dtype):
                logits = model(images)
            num_classes = logits.shape[-1]
            top = logits.float().topk(min(5, num_classes), dim=-1).indices
            hit = top == labels[:, None]
            c1, c5 = hit[:, 0].sum(), hit.any(dim=-1).sum()
            correct1 = c1 if correct1 is None else correct1 + c1
            correct5 = c5 if correct5 is None else correct5 + c5
            n += images.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("classifier_accuracy: the loader yielded no images")
    out = {f"{prefix}top1": 100.0 * correct1.item() / n}
    if num_classes >= 5:
        out[f"{prefix}top5"] = 100.0 * correct5.item() / n
    return out


class SupervisedMethod(Method):
    """A classifier ``student`` trained on ``(images, labels)`` batches whose labels become soft targets
    (Mixup/CutMix and label smoothing of the method's ``SupervisedConfig``): what MaskSub and MaskedKD
    share.  Subclasses implement ``training_step``, starting from ``images, targets = self.mix(batch, state)``."""

    pipeline = "supervised"

    def __init__(self, cfg, num_classes: int, student: nn.Module):
        super().__init__(cfg, num_classes)
        self.student = student
        self.mixer = TargetMixer(self.mcfg, num_classes)

    def mix(self, batch, state: StepState) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(images, soft targets [B, C])`` of a raw or an already prepared batch."""
        images, labels = batch
        return self.mixer(images, labels, state.generator)

    def prepare_batch(self, batch, state: StepState):
        """Mixup/CutMix (timm, numpy RNG: host work) ahead of a compiled step: ``(images, soft targets)``,
        which ``training_step``'s mixer passes through."""
        if self.mixer.mixup is None:
            return batch
        return self.mix(batch, state)

    def evaluate_classifier(self, loader, device, amp_dtype=None) -> dict:
        return classifier_accuracy(self.student, loader, device, amp_dtype)
