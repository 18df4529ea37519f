"""fastmask: fused GPU kernels and a training package for masked Vision-Transformer training.

``fastmask.ops`` holds the drop-in ops; ``python -m fastmask.train`` runs the training driver.
"""
from . import ops
from .ops import (
    KeptTokens,
    MaskedTokens,
    apply_mask_token,
    attention,
    backends,
    cls_attention_mask,
    gather_tokens,
    random_keep,
    random_masking,
    scatter_tokens,
    topk_tokens,
)

__version__ = "0.1.0"
