"""timm-compatible modules built on ``fastmask.ops``.

``Attention`` is timm's ``Attention`` (same parameters and state-dict keys) running on
``fastmask.ops.attention`` and returning the CLS attention map on request; ``Block`` is timm's ViT
block built with it, passing ``return_cls_attn=`` through; ``convert_attention``/``convert_blocks``
convert an existing timm model in place.
"""

from .attention import Attention, convert_attention, explicit_attention, iter_attention
from .block import Block, convert_blocks

__all__ = ["Attention", "Block", "convert_attention", "convert_blocks", "explicit_attention", "iter_attention"]
