"""Reading a ViT's internals layer by layer: attention matrices and block outputs.

Works on any timm-style ViT (``model.blocks[i].attn`` with a ``qkv`` projection), which includes
fastmask's MaskedViT.  The attention matrix is *recomputed* in float32 from the block's input by
a forward pre-hook (``softmax(q k^T * scale)`` from the layer's own qkv projection and q/k norms),
so it is exact whatever attention path the model itself runs (fused SDPA, fastmask kernels) and the
[B, H, L, L] matrix only ever exists for one layer at a time.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional

import torch
from torch import nn

__all__ = ["find_blocks", "attention_matrix", "LayerRecorder", "math_attention"]


def find_blocks(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks of a ViT, in depth order."""
    for owner in (model, getattr(model, "backbone", None), getattr(model, "module", None)):
        blocks = getattr(owner, "blocks", None) if owner is not None else None
        if blocks is not None:
            return list(blocks)
    raise ValueError(f"model ({type(model).__name__}) has no `blocks`; expected a timm-style ViT")


def attention_matrix(attn_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The softmax attention [B, H, L, L] (float32) that ``attn_module`` computes for input ``x`` [B, L, C]."""
    qkv_proj = getattr(attn_module, "qkv", None)
    num_heads = getattr(attn_module, "num_heads", None)
    if qkv_proj is None or num_heads is None:
        raise ValueError(
            f"{type(attn_module).__name__} has no `qkv` projection / `num_heads`; cannot recompute its attention"
        )
    b, length, _ = x.shape
    qkv = qkv_proj(x).float().reshape(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q_norm, k_norm = getattr(attn_module, "q_norm", None), getattr(attn_module, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q).float()
    if k_norm is not None:
        k = k_norm(k).float()
    scale = getattr(attn_module, "scale", None)
    if not isinstance(scale, (int, float)):
        scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


class LayerRecorder:
    """Context manager that calls ``on_attention(layer, attn [B, H, L, L] float32)`` and
    ``on_features(layer, tokens [B, L, C])`` for every block of ``model`` during its forwards.

    Either callback may be None (its hooks are then not installed).
    """

    def __init__(
        self,
        model: nn.Module,
        on_attention: Optional[Callable[[int, torch.Tensor], None]] = None,
        on_features: Optional[Callable[[int, torch.Tensor], None]] = None,
    ):
        self.blocks = find_blocks(model)
        self.on_attention = on_attention
        self.on_features = on_features
        self._handles = []

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            if self.on_attention is not None:
                attn = getattr(block, "attn", None)
                if attn is None:
                    raise ValueError(f"block {i} ({type(block).__name__}) has no `attn` module")
                # The attention input is norm1(x): hook the attention module, not the block.
                self._handles.append(attn.register_forward_pre_hook(self._attn_hook(i)))
            if self.on_features is not None:
                self._handles.append(block.register_forward_hook(self._feat_hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _attn_hook(self, layer: int):
        def hook(module, args, kwargs=None):
            x = args[0] if args else kwargs["x"]
            with torch.no_grad():
                self.on_attention(layer, attention_matrix(module, x.detach()))

        return hook

    def _feat_hook(self, layer: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.on_features(layer, out.detach())

        return hook


@contextlib.contextmanager
def math_attention(model: nn.Module):
    """Run ``model`` with explicit-math attention (``softmax(q k^T) v`` in plain PyTorch ops).

    Needed for Hessian-vector products: double backward is not implemented by the flash /
    memory-efficient SDPA kernels nor by fastmask's fused attention kernels.  This switches timm's
    ``fused_attn`` flags off and fastmask.nn.Attention's ``explicit_attention`` on, forces ``FASTMASK_BACKEND=torch`` (fastmask.ops' reference attention
    is explicit math), and restricts any remaining SDPA call to its math backend.
    """
    saved_flags = []
    for m in model.modules():
        # timm's flag (False = explicit path) and fastmask.nn.Attention's (True = explicit path).
        for flag, value in (("fused_attn", False), ("explicit_attention", True)):
            if isinstance(getattr(m, flag, None), bool):
                saved_flags.append((m, flag, getattr(m, flag)))
                setattr(m, flag, value)
    saved_env = os.environ.get("FASTMASK_BACKEND")
    os.environ["FASTMASK_BACKEND"] = "torch"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_ctx = sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # very old torch: nothing to restrict
        sdpa_ctx = contextlib.nullcontext()
    try:
        with sdpa_ctx:
            yield model
    finally:
        for m, flag, value in saved_flags:
            setattr(m, flag, value)
        if saved_env is None:
            os.environ.pop("FASTMASK_BACKEND", None)
        else:
            os.environ["FASTMASK_BACKEND"] = saved_env
