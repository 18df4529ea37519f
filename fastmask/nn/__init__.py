"""timm-compatible modules built on ``fastmask.ops``.

``Attention`` is timm's ``Attention`` (same parameters and state-dict keys) running on
``fastmask.ops.attention`` and exporting the CLS attention map; ``Block`` is timm's ViT block built
with it; ``convert_attention`` converts an existing timm model in place.
"""

from timm.models.vision_transformer import Block as _TimmBlock

from .attention import Attention, convert_attention, explicit_attention, iter_attention


class Block(_TimmBlock):
    """timm's pre-norm ViT block with ``fastmask.nn.Attention`` as its attention (same state-dict keys)."""

    def __init__(self, dim: int, num_heads: int, *args, num_prefix_tokens: int = 1, **kwargs) -> None:
        kwargs.setdefault("attn_layer", Attention)
        super().__init__(dim, num_heads, *args, **kwargs)
        convert_attention(self, num_prefix_tokens=num_prefix_tokens)


__all__ = ["Attention", "Block", "convert_attention", "explicit_attention", "iter_attention"]
