"""The contract between the training driver and a training method.

A method is an ``nn.Module`` holding its networks (student, teacher, heads) and its own buffers
(e.g. DINO's centers), so ``state_dict()`` checkpoints all of it.  The driver owns the loop, the
optimizer and its schedules, AMP, DDP, checkpoints, logging and evaluation; the method only says
how one batch turns into a loss.

Protocol (see ``fastmask/train.py`` for the caller):

* class attributes: ``name``; ``Config`` (a dataclass of the method's own options, defaults = the
  paper's); ``pipeline`` (``"multicrop"`` or ``"supervised"``: which loader the driver builds);
  ``manual_backward`` (if True, ``training_step`` calls ``state.backward(loss_part)`` itself and
  returns the total loss detached, for logging only).
* ``__init__(cfg, num_classes)``: build networks from ``cfg.model`` and options from ``cfg.method``.
* ``training_step(batch, state) -> (loss, metrics)``: ``batch`` is what the loader yields, already on
  the device: ``(crops: list[Tensor], labels)`` for multicrop, ``(images, labels)`` for supervised.
  The driver back-propagates ``loss``; a ``manual_backward`` method under ``state.defer_last_backward``
  returns the part it has not back-propagated and the total as ``metrics["loss"]``.
  With ``compile=step`` the driver compiles it whole (with the backward) in one graph, so it does
  tensor work only: no ``.item()``, no data-dependent Python branches, no host RNG.
* ``prepare_batch(batch, state) -> batch``: host-side work the driver runs eagerly before the step
  (e.g. timm's Mixup/CutMix, which draw from numpy); ``training_step`` must accept both a raw and a
  prepared batch (default: the batch unchanged).
* ``cancel_last_layer_grads(state)``: called after backward (and after gradient unscaling/clipping)
  while ``state.freeze_last_layer`` is True, i.e. during the first ``optim.freeze_last_layer_epochs``.
* ``on_after_optimizer_step(state)``: e.g. the EMA teacher update with ``state.teacher_momentum``.
* ``eval_backbone()``: the module used for k-NN evaluation and attention maps; its
  ``forward_features(x, return_cls_attn=...)`` returns ``fastmask.models.ViTFeatures``.
* ``evaluate_classifier(loader, device, amp_dtype)``: validation accuracy of the method's classifiers
  (``{"val_top1": ..., "val_top5": ...}``, percent) on the driver's eval loader, logged next to the
  k-NN accuracy; ``{}`` for methods without a classifier (the self-supervised ones).
* ``param_groups(weight_decay, rule)``: optimizer groups.  Groups with ``apply_wd=True`` follow the
  driver's weight-decay schedule; the others keep weight decay 0.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["Method", "StepState", "build_backbone", "build_teacher", "ema_update_",
           "split_decay_params"]


@dataclass
class StepState:
    """Everything a method may need to know about the current optimisation step."""

    epoch: int
    step: int  # global step, 0-based, counted over the whole run (continues across resumes)
    steps_per_epoch: int
    total_steps: int
    progress: float  # step / total_steps, in [0, 1)
    lr: float
    wd: float
    teacher_momentum: float
    backward: Callable[[torch.Tensor], None]  # AMP-aware backward (scales the loss when needed)
    device: torch.device
    # Mask randomness: seeded from (seed, step, rank), so a resumed run draws the same masks.
    generator: Optional[torch.Generator] = None
    amp_dtype: Optional[torch.dtype] = None
    freeze_last_layer: bool = False
    rank: int = 0
    world_size: int = 1
    # A method that runs backward() itself for parts of its loss (``manual_backward``) returns the
    # last part un-backpropagated when this is True: the driver's backward of it is the one that
    # averages gradients over ranks (DDP's reducer, overlapped), the earlier ones only accumulate.
    defer_last_backward: bool = False

    @property
    def epoch_float(self) -> float:
        """Fractional epoch, e.g. for per-iteration schedules defined in epochs."""
        return self.step / max(1, self.steps_per_epoch)


def split_decay_params(named_params, skip_names=()) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(decayed, not decayed) under timm's rule: biases, 1-D parameters, tokens and position
    embeddings are exempt, and so is any name containing one of ``skip_names``."""
    from ..engine.optim import decay_split

    named = list(named_params)
    skipped = [p for n, p in named if p.requires_grad and any(s in n for s in skip_names)]
    decay, no_decay = decay_split([(n, p) for n, p in named if not any(s in n for s in skip_names)], "timm")
    return decay, no_decay + skipped


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, for matching parameters.

    Parameters are matched by name so a student with extra modules (e.g. a DDP wrapper's
    ``module.`` prefix is stripped) still works; buffers are copied as they are.
    """
    s_params = {k.removeprefix("module."): v for k, v in student.named_parameters()}
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        s = s_params.get(name.removeprefix("module."))
        if s is None:
            continue
        # FSDP2: teacher and student are sharded alike, so each rank averages its own shards.
        t_list.append(_local(t.data))
        s_list.append(_local(s.data).to(t.dtype))
    if t_list:
        torch._foreach_mul_(t_list, momentum)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


class Method(nn.Module):
    """Base class of every training method (see the module docstring for the protocol)."""

    name: str = "base"
    Config: type = None  # a @dataclass of the method's options
    pipeline: str = "multicrop"  # or "supervised"
    manual_backward: bool = False

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.mcfg = cfg.method  # instance of type(self).Config

    # ------------------------------------------------------------------ hooks for subclasses
    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError for option combinations that cannot work; called before any training."""

    def training_step(self, batch, state: StepState) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def prepare_batch(self, batch, state: StepState):
        """Host-side work on the batch that a compiled step cannot contain (run before ``training_step``)."""
        return batch

    def on_after_optimizer_step(self, state: StepState) -> None:
        """Called once per step after optimizer.step() (e.g. EMA teacher update)."""

    def cancel_last_layer_grads(self, state: StepState) -> None:
        """Zero the gradients of the last head layer while ``state.freeze_last_layer`` is True."""

    def eval_backbone(self) -> nn.Module:
        """The ViT used for k-NN evaluation and attention maps (default: the student's backbone)."""
        student = getattr(self, "student", None)
        if student is None:
            raise NotImplementedError(f"{type(self).__name__} has no `student`; override eval_backbone()")
        student = getattr(student, "module", student)  # unwrap DDP
        return getattr(student, "backbone", student)  # unwrap MultiCropWrapper

    def evaluate_classifier(self, loader, device: torch.device,
                            amp_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
        """Validation top-1/top-5 (percent) of the method's classifier(s) on ``loader`` (the driver's
        eval pipeline over the val split).  Self-supervised methods have none: ``{}``."""
        return {}

    def trainable_modules(self) -> Dict[str, nn.Module]:
        """Modules whose parameters the optimizer updates and DDP synchronises (default: ``student``)."""
        student = getattr(self, "student", None)
        if student is None:
            return {"": self}
        return {"student": student}

    def param_groups(self, weight_decay: float, rule: str = "dino") -> List[Dict[str, Any]]:
        """Optimizer groups of the trainable modules under ``rule`` (``optim.decay_groups``: ``dino``
        or ``timm``, see ``fastmask.engine.optim``)."""
        from ..engine.optim import weight_decay_groups

        named = []
        for prefix, module in self.trainable_modules().items():
            for n, p in module.named_parameters():
                named.append((f"{prefix}.{n}" if prefix else n, p))
        return weight_decay_groups(named, weight_decay, rule)

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        if self.mcfg is not None and dataclasses.is_dataclass(self.mcfg):
            return ", ".join(f"{f.name}={getattr(self.mcfg, f.name)!r}" for f in dataclasses.fields(self.mcfg))
        return ""


def build_backbone(cfg, *, drop_path_rate: Optional[float] = None, num_classes: int = 0, **overrides):
    """The ViT described by ``cfg.model`` (a ``fastmask.models.MaskedViT``), loaded from
    ``cfg.model.checkpoint`` when one is given.  ``drop_path_rate`` overrides the config's
    (e.g. 0 for an EMA teacher)."""
    from ..models import create_vit

    m = cfg.model
    kwargs = {k: getattr(m, k) for k in ("depth", "embed_dim", "num_heads", "no_embed_class") if getattr(m, k, 0)}
    kwargs["drop_path_schedule"] = getattr(m, "drop_path_schedule", "linear")
    kwargs.update(overrides)
    model = create_vit(m.arch, patch_size=m.patch_size, img_size=m.img_size, num_classes=num_classes,
                       drop_path_rate=m.drop_path_rate if drop_path_rate is None else drop_path_rate, **kwargs)
    if getattr(m, "checkpoint", None):
        from ..models import load_checkpoint

        load_checkpoint(model, m.checkpoint)
    return model


def build_teacher(tcfg, student_patch: int, student_grid, *, num_classes: int = 0, img_size=None,
                  method: str = "the method"):
    """The frozen teacher ViT described by a ``TeacherConfig`` (MaskedKD and MaskDistill): patch
    size ``tcfg.patch_size`` (0: ``student_patch``), sized for the student's patch grid (``img_size``
    defaults to ``student_grid * patch``), loaded from ``tcfg.checkpoint``, eval mode, no gradients."""
    from ..models import create_vit, load_checkpoint

    patch = tcfg.patch_size or student_patch
    kwargs = {k: getattr(tcfg, k) for k in ("depth", "embed_dim", "num_heads") if getattr(tcfg, k)}
    if tcfg.pre_norm:
        kwargs["pre_norm"] = True
    if tcfg.act_layer:
        kwargs["act_layer"] = tcfg.act_layer
    teacher = create_vit(tcfg.arch, patch_size=patch, img_size=img_size or student_grid[0] * patch,
                         num_classes=num_classes, **kwargs)
    if tcfg.checkpoint == "auto":  # resolved by the training driver (engine.auto_teacher); not here
        warnings.warn(f"{method}: method.teacher.checkpoint=auto is resolved by python -m fastmask.train; built "
                      "outside it the teacher is randomly initialised", stacklevel=3)
    elif tcfg.checkpoint:
        load_checkpoint(teacher, os.path.expanduser(tcfg.checkpoint), key=tcfg.checkpoint_key)
    else:
        warnings.warn(f"{method} without method.teacher.checkpoint: the teacher is randomly initialised, which "
                      "only makes sense for tests and throughput runs", stacklevel=3)
    teacher.requires_grad_(False)
    return teacher.eval()
