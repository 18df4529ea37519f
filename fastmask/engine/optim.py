"""Optimisation helpers the papers' code does its own way: weight-decay groups and gradient clipping;
and the driver's optimizer (``make_optimizer``) and warm-up + cosine schedules (``cosine_schedule``).

Weight-decay groups (``optim.decay_groups``):

* ``dino``: DINO, iBOT and AttMask (``utils.get_params_groups`` in each repository): no decay for
  biases (names ending in ``.bias``) and 1-D parameters (norms); every other parameter decays,
  ``cls_token``, ``pos_embed`` and iBOT's mask token (``masked_embed``, shape [1, D]) included.
* ``timm``: timm's ``param_groups_weight_decay`` as DeiT, DeiT-III, MaskSub and MaskedKD call it
  through ``timm.optim.create_optimizer`` (and BEiT-style ``get_parameter_groups`` in MaskDistill):
  the same, plus the model's ``no_weight_decay()`` names exempt: class/distillation/register/mask
  tokens and position embeddings.  (fastmask's behaviour before the two were told apart.)

Gradient clipping (``optim.clip_mode``):

* ``per_param``: DINO/iBOT/AttMask ``utils.clip_gradients``: every parameter's gradient is scaled
  by ``min(1, max_norm / (||g|| + 1e-6))`` on its own, so each ends with a norm below ``max_norm``.
* ``global``: ``torch.nn.utils.clip_grad_norm_`` over all parameters together (timm/DeiT/BEiT).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["CLIP_MODES", "DECAY_GROUPS", "OPTIMIZERS", "clip_gradients", "cosine_schedule", "decay_split", "lamb",
           "make_optimizer", "weight_decay_groups"]

OPTIMIZERS = ("adamw", "lamb")

CLIP_MODES = ("per_param", "global")
DECAY_GROUPS = ("dino", "timm")

# Leaf names timm's ViTs return from no_weight_decay() (fastmask's MaskedViT adds mask_token).
_TIMM_NO_DECAY_LEAVES = ("cls_token", "dist_token", "reg_token", "mask_token", "pos_embed")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def decay_split(named_params: Iterable[Tuple[str, nn.Parameter]], rule: str = "dino"
                ) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters under ``rule`` (see the module docstring)."""
    _check_choice("decay_groups", rule, DECAY_GROUPS)
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        exempt = name.endswith(".bias") or p.ndim <= 1
        if rule == "timm" and not exempt:
            leaf = name.rsplit(".", 1)[-1]
            exempt = "token" in leaf or "pos_embed" in leaf or leaf in _TIMM_NO_DECAY_LEAVES
        (no_decay if exempt else decay).append(p)
    return decay, no_decay


def weight_decay_groups(named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float,
                        rule: str = "dino") -> List[Dict[str, Any]]:
    """Optimizer groups: the decayed one follows the driver's weight-decay schedule (``apply_wd``),
    the other keeps weight decay 0 (as the papers' loops update only their first group)."""
    decay, no_decay = decay_split(named_params, rule)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "apply_wd": True})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "apply_wd": False})
    return groups


@torch.no_grad()
def clip_gradients(params: Iterable[torch.Tensor], max_norm: float, mode: str = "per_param") -> torch.Tensor:
    """Clip gradients in place; returns the total L2 norm of all gradients before clipping (a tensor,
    no host synchronisation).

    ``per_param`` scales each gradient by ``min(1, max_norm / (||g|| + 1e-6))`` (DINO's
    ``clip_gradients``, without its per-parameter ``.item()``: multiplying by 1 leaves a gradient
    unchanged, so the clamp does what its ``if clip_coef < 1`` did).  ``global`` is
    ``torch.nn.utils.clip_grad_norm_``.
    """
    _check_choice("clip_mode", mode, CLIP_MODES)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]))
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, float(max_norm))
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return total


def lamb(groups, lr: float, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    """LAMB as DeiT-III and MaskSub train (``--opt fusedlamb``: apex ``FusedLAMB`` through timm's
    ``create_optimizer``, eps ``--opt-eps`` 1e-8, its default global grad-norm bound of 1.0):
    timm's ``Lamb``, the same algorithm in plain PyTorch."""
    from timm.optim import Lamb

    return Lamb(groups, lr=lr, betas=tuple(betas), eps=1e-8, max_grad_norm=1.0)


def cosine_schedule(step: int, total_steps: int, base: float, final: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / max(1, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def make_optimizer(groups, lr: float, betas, device: torch.device, name: str = "adamw"):
    if name == "lamb":
        return lamb(groups, lr, betas)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore

            return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
        except ImportError:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
