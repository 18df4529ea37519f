"""timm's pre-norm ViT block with ``fastmask.nn.Attention``, handing the CLS map back as a return value.

``Block`` subclasses ``timm.models.vision_transformer.Block`` and adds no parameters (same state-dict
keys, timm weights load unchanged).  ``forward(x, return_cls_attn=True)`` returns ``(x, cls_attn)``:
the map of this block's attention call, ``[B, L - num_prefix_tokens]`` float32;
``return_attn_matrix=True`` adds the attention probabilities ``[B, H, L, L]`` (explicit path).
``convert_blocks`` turns the plain timm blocks of an existing model into this class in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.models.vision_transformer import Block as TimmBlock

from .attention import Attention, convert_attention

__all__ = ["Block", "convert_blocks"]


class Block(TimmBlock):
    """timm's ``Block`` on ``fastmask.nn.Attention``; it can also return the attention's CLS map and matrix."""

    def __init__(self, dim: int, num_heads: int, *args, num_prefix_tokens: int = 1, **kwargs) -> None:
        kwargs.setdefault("attn_layer", Attention)
        super().__init__(dim, num_heads, *args, **kwargs)
        convert_attention(self, num_prefix_tokens=num_prefix_tokens)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, *,
                return_cls_attn: bool = False, return_attn_matrix: bool = False):
        """timm's block; ``return_cls_attn`` / ``return_attn_matrix`` also return this block's CLS map /
        attention probabilities [B, H, L, L] after ``x``, in ``Attention.forward``'s order."""
        if not (return_cls_attn or return_attn_matrix):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        y, *extras = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal,
                               return_cls_attn=return_cls_attn, return_attn_matrix=return_attn_matrix)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, *extras)


def convert_blocks(module: nn.Module, *, num_prefix_tokens: Optional[int] = None) -> int:
    """Turn every plain timm ``Block`` inside ``module`` into ``fastmask.nn.Block`` in place (class
    swap: same parameter objects) and their attention into ``fastmask.nn.Attention``.  Subclasses of
    timm's ``Block`` with their own forward are left alone.  Returns how many blocks were converted."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    converted = 0
    for m in module.modules():
        if type(m) is TimmBlock:
            m.__class__ = Block
            converted += 1
    convert_attention(module, num_prefix_tokens=num_prefix_tokens)
    return converted
