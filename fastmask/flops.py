"""Counting the FLOPs a network actually spends (MaskedKD's teacher, benchmarks).

Two counters that agree with each other on plain PyTorch code (the tests check it):

* :func:`count_flops` runs a call under ``torch.utils.flop_counter.FlopCounterMode``: every matmul,
  convolution and SDPA call that goes through the dispatcher is counted from its real shapes.  It
  cannot see fused kernels launched outside the dispatcher (our Triton/CUDA attention), and the
  dispatch mode itself costs time, so it is the reference, not the per-step meter.
* :class:`FlopMeter` puts forward hooks on a model's ``nn.Linear`` / ``nn.Conv2d`` layers and on its
  attention modules (anything with a ``qkv`` linear and ``num_heads``) and counts, from the shapes
  of the tensors each call really received, ``2 * rows * in * out`` per linear, ``2 * out_elems *
  in_per_group * kh * kw`` per convolution and ``4 * B * L * L * inner`` per attention (``q k^T``
  plus ``p v``).  That is exactly what FlopCounterMode counts for the same model, but it works
  whichever attention backend runs and costs a few Python calls per layer.

:class:`SavedActivationMeter` is the memory counterpart: the peak bytes of activations autograd
keeps for backward during a piece of code (MaskSub's sequential backward is judged by it on CPU).

Counts are multiply-adds times two (the convention of FlopCounterMode and of the MaskedKD/DeiT
papers' "GFLOPs" is MACs; divide by 2 to compare with those tables).  Elementwise work (norms,
activations, softmax) is not counted by either.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

__all__ = ["FlopMeter", "SavedActivationMeter", "count_flops", "is_attention_module", "linear_flops",
           "register_cpu_sdpa_flops"]


def register_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU kernels of ``F.scaled_dot_product_attention``.

    torch (2.14) counts SDPA's CUDA kernels (flash, efficient, cuDNN) but not the CPU flash kernel
    that SDPA picks on the CPU, so any CPU count of timm's fused attention, or of the ``torch``
    backend of ``fastmask.ops.attention``, would leave attention out.  Registered with torch's own
    SDPA formulas (same shapes, same count); done once, when fastmask is imported.
    """
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = (("_scaled_dot_product_flash_attention_for_cpu", aten._scaled_dot_product_flash_attention),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", aten._scaled_dot_product_flash_attention_backward))
    for name, counted_like in pairs:
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry and counted_like in flop_counter.flop_registry:
            flop_counter.flop_registry[op] = flop_counter.flop_registry[counted_like]


def count_flops(fn: Callable, *args, **kwargs) -> Tuple[Any, int]:
    """``(fn(*args, **kwargs), flops)`` with flops counted by ``FlopCounterMode`` (forward and,
    if ``fn`` runs one, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    return 2 * rows * in_features * out_features


def is_attention_module(module: nn.Module) -> bool:
    """timm-style self-attention: a fused ``qkv`` projection and a head count."""
    return isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads")


def _first_tensor(inputs) -> Optional[torch.Tensor]:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t
    return None


class FlopMeter:
    """Forward FLOPs of ``model`` counted from the shapes its layers really see.

    Usage::

        meter = FlopMeter(teacher)
        with meter.measure() as m:
            teacher(images, ids_keep=ids_keep)
        m.flops   # FLOPs of that call

    Hooks only count inside ``measure()``; outside they return at once.  ``per_module`` breaks the
    last measurement down by module kind (``linear``, ``conv``, ``attention``).
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self._active = False
        self.flops = 0
        self.per_module: Dict[str, int] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._linear_hook))
            elif isinstance(module, nn.Conv2d):
                self._handles.append(module.register_forward_hook(self._conv_hook))
            if is_attention_module(module):
                self._handles.append(module.register_forward_hook(self._attention_hook))

    # ------------------------------------------------------------------ hooks
    def _add(self, kind: str, flops: int) -> None:
        self.flops += flops
        self.per_module[kind] = self.per_module.get(kind, 0) + flops

    def _linear_hook(self, module: nn.Linear, inputs, output) -> None:
        if not self._active:
            return
        x = _first_tensor(inputs)
        if x is None:
            return
        rows = x.numel() // module.in_features
        self._add("linear", linear_flops(rows, module.in_features, module.out_features))

    def _conv_hook(self, module: nn.Conv2d, inputs, output) -> None:
        if not self._active or not isinstance(output, torch.Tensor):
            return
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        self._add("conv", 2 * output.numel() * per_output)

    def _attention_hook(self, module: nn.Module, inputs, output) -> None:
        if not self._active:
            return
        x = _first_tensor(inputs)
        if x is None or x.dim() != 3:
            return
        B, L, _ = x.shape
        inner = module.qkv.out_features // 3
        self._add("attention", 4 * B * L * L * inner)

    # ------------------------------------------------------------------ API
    @contextlib.contextmanager
    def measure(self) -> Iterator["FlopMeter"]:
        """Count the FLOPs of the forward calls made inside the block (resets the count first)."""
        if self._active:
            raise RuntimeError("FlopMeter.measure() is not re-entrant")
        self.flops = 0
        self.per_module = {}
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self):  # hooks must not outlive the meter that counts them
        try:
            self.remove()
        except Exception:
            pass


class SavedActivationMeter:
    """Bytes of tensors autograd has saved for backward that are alive right now, and their peak.

    Inside ``track()`` every tensor autograd saves is wrapped in a small holder; the holder adds the
    tensor's bytes when it is created and subtracts them when the graph frees its saved tensors
    (after backward, or when the graph is dropped).  So ``peak`` is the largest amount of
    activation memory a piece of training code kept alive at once, on any device, without a
    device allocator's statistics.  Tensors sharing storage with ``exclude`` (the parameters, which
    are alive anyway) are not counted; views of one activation saved twice are counted twice.
    """

    def __init__(self, exclude=()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        nbytes = 0 if t.untyped_storage().data_ptr() in self._excluded else t.numel() * t.element_size()
        return _SavedHolder(self, t, nbytes)

    @staticmethod
    def _unpack(holder: "_SavedHolder") -> torch.Tensor:
        return holder.tensor

    @contextlib.contextmanager
    def track(self) -> Iterator["SavedActivationMeter"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _SavedHolder:
    __slots__ = ("meter", "tensor", "nbytes")

    def __init__(self, meter: SavedActivationMeter, tensor: torch.Tensor, nbytes: int):
        self.meter, self.tensor, self.nbytes = meter, tensor, nbytes
        meter.live += nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.nbytes
