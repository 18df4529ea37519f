"""Tiny instances of every training method and a batch for each, for compile tests and benchmarks
(imported as ``tiny_methods``; tests/ is on sys.path for the tests and for bench/).

ViTs of depth 2, width 32 and 32 px images with 8 px patches (16 tokens; local crops 16 px, 4
tokens), heads of width 64: a full training step costs a few milliseconds on a CPU core.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from fastmask.config import load_config
from fastmask.methods import get_method
from fastmask.methods.base import StepState

TINY_MODEL = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
              "data.image_size=32", "data.local_size=16"]
TINY_HEAD = ["method.out_dim=64", "method.head_hidden_dim=32", "method.head_bottleneck_dim=16"]
TINY_TEACHER = ["method.teacher.depth=2", "method.teacher.embed_dim=48", "method.teacher.num_heads=2"]
NO_MIX = ["method.mixup_alpha=0", "method.cutmix_alpha=0"]
NUM_CLASSES = 4

# name -> (recipe, overrides)
CASES: Dict[str, Tuple[str, List[str]]] = {
    "dino": ("dino_tiny_builtin", TINY_HEAD + ["method.student_mask=random"]),
    "dino_drop": ("dino_tiny_builtin", TINY_HEAD + ["method.student_mask=random", "method.student_mask_mode=drop"]),
    "ibot_attmask_high": ("ibot_tiny_builtin", TINY_HEAD + ["method.patch_out_dim=64", "method.mask=attmask_high"]),
    # No head BatchNorm: the patch head runs on the masked tokens only (eager) / every token (compiled).
    "ibot_attmask_hint": ("ibot_tiny_builtin", TINY_HEAD + ["method.patch_out_dim=64", "method.mask=attmask_hint",
                                                            "method.head_use_bn=false"]),
    "masksub": ("masksub_tiny_builtin", NO_MIX),
    "maskedkd": ("maskedkd_tiny_builtin", NO_MIX + TINY_TEACHER),
    "maskdistill": ("maskdistill_tiny_builtin", TINY_TEACHER),
}


def make_method(name: str, *overrides: str, seed: int = 0):
    recipe, case = CASES[name]
    cfg = load_config(config=recipe, overrides=TINY_MODEL + case + list(overrides))
    torch.manual_seed(seed)
    method = get_method(cfg.method_name)(cfg, NUM_CLASSES)
    return method.train()


def make_batch(method, batch: int = 4, seed: int = 1, device="cpu"):
    """A batch as the method's loader yields it: 2 global 32 px + 2 local 16 px crops (multicrop) or
    32 px images (supervised), with labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    if method.pipeline == "multicrop":
        crops = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)]
        crops += [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)]
        return [c.to(device) for c in crops], labels
    return torch.randn(batch, 3, 32, 32, generator=g).to(device), labels


def make_state(step: int = 0, epoch: int = 0, generator=None, device="cpu") -> StepState:
    return StepState(epoch=epoch, step=step, steps_per_epoch=10, total_steps=100, progress=step / 100, lr=1e-3,
                     wd=0.0, teacher_momentum=0.9, backward=lambda loss: loss.backward(),
                     device=torch.device(device), generator=generator)
