"""Numerical safety of a training step: skip non-finite steps, and the AMP policy per device.

``NonFiniteGuard`` decides after backward whether the optimizer may step: a non-finite loss or
gradient norm skips the step (no parameter, optimizer-state or EMA-teacher update; the gradients are
dropped), the skip is counted and logged, and ``max_consecutive`` skips in a row stop the run with
a ``NonFiniteError`` that says what to try.  fp16/bf16 runs of DINO/iBOT/MAE lose steps this way
now and then (a loss spike, an overflow in one attention logit); one bad batch should not end or
poison a run, a diverged one should stop instead of training on NaNs.  The check reads one bool
from the device per step (the fp16 GradScaler path does the same read).

``amp_policy(device, amp)`` picks the autocast dtype and whether loss scaling is needed:

=================  ======================================================================
``amp``            result
=================  ======================================================================
``auto``           CUDA with native bf16 (compute capability >= 8.0: A100, H100/H200, RTX 30xx+):
                   bf16, no loss scaling (bf16 has float32's exponent range).  Older CUDA
                   GPUs (V100, T4): fp16 with a dynamic ``GradScaler``.  CPU: off (float32;
                   CPU autocast is slower than float32 on most CPUs).
``bf16`` / ``on``  bf16 without scaling; on a CUDA GPU without native bf16 an error (it would be
                   emulated, slowly); allowed on the CPU.
``fp16``           fp16 with a dynamic ``GradScaler`` (CUDA only).
``off``            float32.
=================  ======================================================================
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Union

import torch

__all__ = ["AmpPolicy", "NonFiniteError", "NonFiniteGuard", "amp_policy", "grad_norm"]

_logger = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "bf16", "on", "fp16", "off")


class NonFiniteError(FloatingPointError):
    """Too many non-finite steps in a row: the run has diverged."""


@dataclass(frozen=True)
class AmpPolicy:
    dtype: Optional[torch.dtype]  # autocast dtype, None = float32 (autocast off)
    loss_scaling: bool  # a dynamic GradScaler is needed (fp16)
    reason: str  # why, for the run's log

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def make_scaler(self, device: torch.device):
        return torch.amp.GradScaler(device.type) if self.loss_scaling else None


def _native_bf16(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def amp_policy(device: Union[torch.device, str], amp: str = "auto") -> AmpPolicy:
    """The autocast dtype and loss scaling for ``device`` (see the module docstring)."""
    device = torch.device(device)
    amp = str(amp).lower()
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "off":
        return AmpPolicy(None, False, "amp=off: float32")
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp=fp16 needs a CUDA device (use bf16 or off on the CPU)")
        return AmpPolicy(torch.float16, True, "amp=fp16: fp16 autocast with dynamic loss scaling")
    if amp in ("bf16", "on"):
        if device.type == "cuda" and not _native_bf16(device):
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"amp={amp}: {name} has no native bf16 (compute capability < 8.0); use amp=fp16 "
                             "(loss-scaled) or amp=auto")
        return AmpPolicy(torch.bfloat16, False, f"amp={amp}: bf16 autocast, no loss scaling")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if _native_bf16(device):
            return AmpPolicy(torch.bfloat16, False, f"amp=auto: bf16 on {name} (native bf16), no loss scaling")
        return AmpPolicy(torch.float16, True, f"amp=auto: fp16 with dynamic loss scaling on {name} (no native bf16)")
    return AmpPolicy(None, False, f"amp=auto: float32 on {device.type}")


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (a device scalar; inf/nan when any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


class NonFiniteGuard:
    """Counts non-finite steps and tells the loop whether to step.

    Usage: ``guard.save_buffers(model)`` before the forward, then after backward (and
    ``scaler.unscale_``, with fp16) and clipping::

        if guard.check(loss, grad_norm, step=step):
            optimizer.step(); ema_update(...)
        else:
            guard.skip(optimizer, scaler)      # drop the gradients; the scaler still shrinks its scale
    """

    def __init__(self, max_consecutive: int = 10, *, enabled: bool = True):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive must be an int >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.enabled = bool(enabled)
        self.skipped_total = 0
        self.consecutive = 0
        self.last_reason: Optional[str] = None

    def check(self, loss: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor] = None, *,
              step: Optional[int] = None) -> bool:
        """True if the step may proceed; False (counted, logged) if the loss or the gradient norm is
        not finite.  Raises ``NonFiniteError`` at ``max_consecutive`` skips in a row."""
        if not self.enabled:
            return True
        values = [t for t in (loss, grad_norm) if t is not None]
        if not values:
            return True
        flags = torch.stack([torch.as_tensor(t).detach().float().reshape(()).isfinite() for t in values])
        if bool(flags.all()):  # the one device -> host read per step
            self.consecutive = 0
            return True
        bad = []
        for name, t in (("loss", loss), ("grad norm", grad_norm)):
            if t is not None:
                v = float(torch.as_tensor(t).detach().float().reshape(()))
                if not math.isfinite(v):
                    bad.append(f"{name} {v}")
        self.skipped_total += 1
        self.consecutive += 1
        where = f"step {step}: " if step is not None else ""
        self.last_reason = ", ".join(bad)
        _logger.warning("%snon-finite %s; optimizer step skipped (%d in a row, %d in total)",
                        where, self.last_reason, self.consecutive, self.skipped_total)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{where}{self.consecutive} non-finite steps in a row ({self.last_reason}; {self.skipped_total} "
                f"skipped in total): the run has diverged. Resume from the last checkpoint with a lower optim.lr, "
                "stronger gradient clipping (optim.clip_grad), or amp=off / amp=bf16 instead of fp16")
        return False

    def save_buffers(self, module: torch.nn.Module) -> None:
        """Remember ``module``'s buffers (BatchNorm running statistics and counts) before the forward,
        so that a skipped step also undoes what its forward wrote there (NaN statistics would poison
        every later step).  ViTs have none or a few: the copies are small."""
        self._buffers = [(b, b.detach().clone()) for b in module.buffers()] \
            if self.enabled else []

    def skip(self, optimizer: torch.optim.Optimizer, scaler=None) -> None:
        """What a skipped step does instead of ``optimizer.step()``: the gradients are dropped, saved
        buffers are restored, and a GradScaler (fp16) still lowers its scale for the next step."""
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buf, saved in getattr(self, "_buffers", []):
                buf.copy_(saved)
        self._buffers = []
        if scaler is not None:
            scaler.update()

    def metrics(self) -> Dict[str, int]:
        return {"nonfinite_skipped": self.skipped_total, "nonfinite_consecutive": self.consecutive}

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.consecutive = int(state.get("consecutive", 0))
