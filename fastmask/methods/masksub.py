"""MaskSub: supervised training with a masked sub-branch (Heo et al., "Masking meets Supervision").

One network, two forward passes per batch:

* main branch: the full image, the recipe's usual loss against the (mixed, smoothed) labels;
* sub-branch: the same images with ``mask_ratio`` of the patch tokens *dropped* (MAE-style: the
  network really runs on ``K = int(N * (1 - mask_ratio))`` patch tokens plus CLS), trained towards
  the main branch's detached prediction: ``CE(sub, softmax(main))`` (``BCE(sub, sigmoid(main))``
  with the DeiT-III BCE loss).

The total loss is ``main_weight * L_main + sub_weight * L_sub`` (both 1/2 in the paper).  With
``sequential_backward`` (default) the main branch's backward runs *before* the sub-branch's
forward, so the main branch's activations are freed first and peak memory is that of one branch,
not two; the gradients of both halves accumulate and the driver takes one optimizer step.

Variants (``variant``), all with the same loss and schedule:
  ``masksub``    sub-branch on the tokens kept by random masking (the paper's main method);
  ``dropsub``    sub-branch on all tokens with dropout ``sub_drop_rate`` on the attention-projection
                 and MLP outputs of every block;
  ``pathsub``    sub-branch on all tokens with drop-path (stochastic depth) ``sub_drop_path_rate``
                 in every block;
  ``masktoken``  sub-branch on all N tokens, the masked ones replaced by the model's mask token
                 (BEiT/SimMIM-style).  Not from the paper: the costlier alternative that the
                 benchmark compares MaskSub's token dropping against.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .. import ops
from .base import StepState
from .supervised import (SupervisedConfig, SupervisedMethod, autocast_for, build_classifier,
                          check_supervised_config, classification_loss, self_distillation_loss, top1_accuracy)

__all__ = ["METHOD", "MaskSub", "MaskSubConfig", "VARIANTS", "sub_branch_regularisation"]

VARIANTS = ("masksub", "dropsub", "pathsub", "masktoken")


@dataclass
class MaskSubConfig(SupervisedConfig):
    """MaskSub options; defaults follow the paper's DeiT-III recipe (BCE, no smoothing, Mixup/CutMix)."""

    variant: str = "masksub"
    mask_ratio: float = 0.5  # masksub / masktoken: fraction of patch tokens hidden from the sub-branch
    # The official code has one sub-branch ratio for every variant (naver-ai/augsub deit/main.py
    # --augsub-ratio, default 0.5: masking ratio, dropout rate or drop-path rate alike).
    sub_drop_rate: float = 0.5  # dropsub: dropout in the sub-branch's blocks
    sub_drop_path_rate: float = 0.5  # pathsub: drop-path in every block of the sub-branch
    main_weight: float = 0.5
    sub_weight: float = 0.5
    sequential_backward: bool = True  # main backward before the sub forward (peak memory of one branch)
    layer_scale_init: Optional[float] = None  # DeiT-III's LayerScale (1e-4); None: plain ViT blocks
    loss: str = "bce"
    label_smoothing: float = 0.0

    def __post_init__(self):
        check_masksub_config(self)


def check_masksub_config(cfg: MaskSubConfig) -> None:
    check_supervised_config(cfg)
    if cfg.variant not in VARIANTS:
        raise ValueError(f"method.variant must be one of {VARIANTS}, got {cfg.variant!r}")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ValueError(f"method.mask_ratio must lie in (0, 1), got {cfg.mask_ratio}")
    if not 0.0 <= cfg.sub_drop_rate < 1.0:
        raise ValueError(f"method.sub_drop_rate must lie in [0, 1), got {cfg.sub_drop_rate}")
    if not 0.0 <= cfg.sub_drop_path_rate < 1.0:
        raise ValueError(f"method.sub_drop_path_rate must lie in [0, 1), got {cfg.sub_drop_path_rate}")
    if cfg.main_weight < 0 or cfg.sub_weight < 0:
        raise ValueError(f"method.main_weight and method.sub_weight must be >= 0, got {cfg.main_weight}, {cfg.sub_weight}")


# ------------------------------------------------------------------------------------------------
# sub-branch pieces
# ------------------------------------------------------------------------------------------------

# Dropout layers DropSub turns up: the outputs of the attention projection and of the MLP, as in the
# MaskSub code base.  Attention-probability dropout is left alone (it would force the explicit
# attention path and changes a different thing).
_SUB_DROPOUT_NAMES = ("proj_drop", "drop1", "drop2", "drop")
_DROP_PATH_NAMES = ("drop_path1", "drop_path2", "drop_path")


def _blocks(model: nn.Module):
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `blocks`; DropSub/PathSub need a ViT with transformer blocks")
    return list(blocks)


@contextlib.contextmanager
def sub_branch_regularisation(
    model: nn.Module, *, drop_rate: Optional[float] = None, drop_path_rate: Optional[float] = None
) -> Iterator[nn.Module]:
    """Within the block, ``model``'s transformer blocks use dropout ``drop_rate`` (on the attention
    projection and MLP outputs) and/or drop-path ``drop_path_rate`` (every block, both residual
    branches); the original layers and rates come back afterwards, even on error.

    Blocks built without drop-path hold an ``nn.Identity`` there (timm); it is swapped for a
    ``DropPath`` for the duration of the block.
    """
    from timm.layers import DropPath

    changed_p = []  # (dropout module, old p)
    swapped = []  # (parent module, attribute, old module)
    try:
        for block in _blocks(model):
            if drop_rate is not None:
                for name, m in block.named_modules():
                    if isinstance(m, nn.Dropout) and name.rsplit(".", 1)[-1] in _SUB_DROPOUT_NAMES:
                        changed_p.append((m, m.p))
                        m.p = float(drop_rate)
            if drop_path_rate is not None:
                for attr in _DROP_PATH_NAMES:
                    old = block._modules.get(attr)
                    if old is None:
                        continue
                    swapped.append((block, attr, old))
                    block._modules[attr] = DropPath(float(drop_path_rate))
        yield model
    finally:
        for m, p in changed_p:
            m.p = p
        for parent, attr, old in swapped:
            parent._modules[attr] = old


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------

class MaskSub(SupervisedMethod):
    name = "masksub"
    Config = MaskSubConfig
    manual_backward = True

    def __init__(self, cfg, num_classes: int, *, student: Optional[nn.Module] = None):
        if student is None:
            student = build_classifier(cfg, num_classes, layer_scale_init=cfg.method.layer_scale_init)
        super().__init__(cfg, num_classes, student)
        mcfg: MaskSubConfig = self.mcfg
        if mcfg.variant == "masktoken" and getattr(self.student, "mask_token", None) is None:
            raise ValueError("variant 'masktoken' needs a model with a mask_token")

    @property
    def num_patches(self) -> int:
        return int(self.student.num_patches)

    def sub_forward(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, int]:
        """The sub-branch's logits and the number of patch tokens it ran on."""
        mcfg: MaskSubConfig = self.mcfg
        N = self.num_patches
        if mcfg.variant == "dropsub":
            with sub_branch_regularisation(self.student, drop_rate=mcfg.sub_drop_rate):
                return self.student(images), N
        if mcfg.variant == "pathsub":
            with sub_branch_regularisation(self.student, drop_path_rate=mcfg.sub_drop_path_rate):
                return self.student(images), N
        # One op gives the kept ids and the mask together (Philox, identical on every backend).
        kept = ops.random_keep(images.shape[0], N, mcfg.mask_ratio, generator=generator, device=images.device)
        if mcfg.variant == "masksub":
            return self.student(images, ids_keep=kept.ids_keep), kept.ids_keep.shape[1]
        # masktoken: every token is computed, the hidden ones replaced by the mask token
        return self.student(images, mask=kept.mask), N

    def training_step(self, batch, state: StepState) -> Tuple[torch.Tensor, Dict[str, float]]:
        mcfg: MaskSubConfig = self.mcfg
        images, targets = self.mix(batch, state)

        with autocast_for(state.device, state.amp_dtype):
            logits_main = self.student(images)
        loss_main = classification_loss(logits_main, targets, mcfg.loss)
        main_out = logits_main.detach()
        if mcfg.sub_weight == 0:
            # Plain supervised training (the paired baseline of MaskSub): no sub-branch to run.
            last = mcfg.main_weight * loss_main
            metrics = {"loss_main": loss_main.detach(), "acc_main": top1_accuracy(main_out, targets)}
            if state.defer_last_backward:
                return last, {"loss": last.detach(), **metrics}
            state.backward(last)
            return last.detach(), metrics
        if mcfg.sequential_backward:
            # Backward now: the main branch's saved activations are freed before the sub forward.
            state.backward(mcfg.main_weight * loss_main)
            loss_main = loss_main.detach()
            del logits_main

        with autocast_for(state.device, state.amp_dtype):
            logits_sub, sub_tokens = self.sub_forward(images, state.generator)
        loss_sub = self_distillation_loss(logits_sub, main_out, mcfg.loss)
        total = mcfg.main_weight * loss_main + mcfg.sub_weight * loss_sub
        # Sequential: only the sub-branch's graph is left.  Otherwise both graphs are alive here and
        # one backward runs through both (the memory-hungry baseline).
        last = mcfg.sub_weight * loss_sub if mcfg.sequential_backward else total
        if not state.defer_last_backward:
            state.backward(last)

        # Detached tensors, not floats: no device sync per step (the driver converts when it logs).
        metrics = {
            "loss_main": loss_main.detach(),
            "loss_sub": loss_sub.detach(),
            "sub_tokens": float(sub_tokens),
            "acc_main": top1_accuracy(main_out, targets),
        }
        if state.defer_last_backward:
            return last, {"loss": total.detach(), **metrics}
        return total.detach(), metrics


METHOD = MaskSub
