"""A timm-compatible multi-head self-attention whose forward goes through ``fastmask.ops.attention``.

``Attention`` subclasses ``timm.layers.Attention`` and adds no parameters, so its constructor, its
parameters and its state-dict keys (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``) are
timm's: pretrained timm weights load unchanged, and ``convert_attention`` turns the attention modules
of an existing timm model into this class in place (same parameter objects, so optimisers and EMA
copies keep pointing at the right tensors).

What it adds:

* the CLS attention map of a call: ``forward(x, return_cls_attn=True)`` returns ``(out, cls_attn)``
  (float32 ``[B, L - num_prefix_tokens]``, head-averaged, no gradient).  The map is only ever a return
  value: ``fastmask.nn.Block`` and ``MaskedViT`` pass ``return_cls_attn=`` down and hand it back up,
  so a compiled or exported forward sees one data flow and no module state changes during a call;
* an explicit-math path (``softmax(q k^T) v`` with the ``[B, H, L, L]`` matrix materialised) used
  when the caller needs the full matrix (``return_attn_matrix=True``: a return value too),
  when it needs double backward (``explicit_attention = True``, e.g. Hessian-vector products), and
  when the fused op cannot express the call (an ``attn_mask``, ``is_causal``, attention dropout in
  training).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from timm.layers import Attention as TimmAttention

from .. import ops

__all__ = ["Attention", "convert_attention", "explicit_attention", "iter_attention"]


class Attention(TimmAttention):
    """timm's ``Attention`` with its forward on ``fastmask.ops.attention`` and the CLS map exported.

    Extra constructor arguments (keyword-only, all plain attributes, none in the state dict):
      num_prefix_tokens: tokens at the start of the sequence (CLS, distillation, registers) that the
          CLS map leaves out; 1 for a plain ViT, 2 for DeiT with a distillation token.
      explicit_attention: always use the explicit-math path (double backward, full matrix).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *args,
        num_prefix_tokens: int = 1,
        explicit_attention: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        self._init_fastmask(num_prefix_tokens, explicit_attention)

    def _init_fastmask(self, num_prefix_tokens: int = 1, explicit_attention: bool = False) -> None:
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        self.num_prefix_tokens = num_prefix_tokens
        self.explicit_attention = bool(explicit_attention)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"explicit_attention={self.explicit_attention}"
        )

    # ------------------------------------------------------------------------------------------
    def _cls_map(self, probs: torch.Tensor) -> torch.Tensor:
        # Row of query 0 over the patch keys, averaged over heads: the ops.attention contract.
        return probs[:, :, 0, self.num_prefix_tokens:].float().mean(dim=1).detach()

    def _explicit(self, q, k, v, attn_mask, is_causal):
        L = q.shape[2]
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            scores = scores + scores.new_full((L, L), float("-inf")).triu_(1)
        elif attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # SDPA semantics: True = may attend
                bias = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
            else:
                bias = attn_mask.to(scores.dtype)
            scores = scores + bias
        # Softmax in float32 (half-precision softmax over long rows loses the small probabilities
        # the CLS map is made of); the matmul with v runs in v's dtype as timm's explicit path does.
        probs = torch.softmax(scores.float(), dim=-1)
        out = self.attn_drop(probs.to(v.dtype)) @ v
        return out, probs

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        return_cls_attn: bool = False,
        return_attn_matrix: bool = False,
    ):
        """x [B, L, C] -> out [B, L, dim_out]; plus ``cls_attn`` [B, L - num_prefix_tokens] (float32)
        when ``return_cls_attn``, plus the probabilities [B, H, L, L] when ``return_attn_matrix``
        (in that order)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a [B, L, C] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        B, L, _ = x.shape
        want_cls = return_cls_attn
        if want_cls and not 0 < self.num_prefix_tokens <= L:
            raise ValueError(
                f"the CLS map needs a prefix (CLS) token: num_prefix_tokens={self.num_prefix_tokens}, sequence length {L}"
            )
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        explicit = (
            self.explicit_attention
            or return_attn_matrix
            or attn_mask is not None
            or is_causal
            or (self.training and self.attn_drop.p > 0)
        )
        cls_attn = probs = None
        if explicit:
            out, probs = self._explicit(q, k, v, attn_mask, is_causal)
            if want_cls:
                cls_attn = self._cls_map(probs)
        else:
            # Under autocast q_norm/k_norm (LayerNorm) return float32 while v is half: the op wants one dtype.
            if q.dtype != v.dtype:
                q, k = q.to(v.dtype), k.to(v.dtype)
            # num_prefix_tokens only shapes the CLS map; without one any valid value will do.
            prefix = self.num_prefix_tokens if want_cls else 1
            # q, k, v already carry the autocast dtype; autocast must not re-cast the op's internals
            # (the torch reference would otherwise run its float32 softmax in half precision).
            with torch.autocast(q.device.type, enabled=False):
                res = ops.attention(q, k, v, scale=self.scale, return_cls_attn=want_cls, num_prefix_tokens=prefix)
            out, cls_attn = res if want_cls else (res, None)

        out = out.transpose(1, 2).reshape(B, L, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))

        extras = []
        if return_cls_attn:
            extras.append(cls_attn)
        if return_attn_matrix:
            extras.append(probs)
        return (out, *extras) if extras else out


def iter_attention(module: nn.Module) -> Iterator[Attention]:
    """Every ``fastmask.nn.Attention`` inside ``module`` (itself included)."""
    for m in module.modules():
        if isinstance(m, Attention):
            yield m


def convert_attention(module: nn.Module, *, num_prefix_tokens: Optional[int] = None) -> int:
    """Turn every plain ``timm.layers.Attention`` inside ``module`` into ``fastmask.nn.Attention``, in place.

    The modules keep their parameters (the same tensor objects), so state dicts, optimisers and
    outputs are unchanged.  ``num_prefix_tokens`` defaults to ``module.num_prefix_tokens`` (timm's
    ``VisionTransformer`` has it: 1, or 2 with a DeiT distillation token, plus register tokens), else 1;
    already-converted modules get it updated.  Subclasses of timm's ``Attention`` with their own
    forward (e.g. ``AttentionRope``) are left alone.  Returns how many modules were converted.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if num_prefix_tokens is None:
        num_prefix_tokens = getattr(module, "num_prefix_tokens", 1)
    converted = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.num_prefix_tokens = num_prefix_tokens
        elif type(m) is TimmAttention:
            m.__class__ = Attention
            m._init_fastmask(num_prefix_tokens)
            converted += 1
    return converted


@contextlib.contextmanager
def explicit_attention(module: nn.Module, enabled: bool = True):
    """Within the block, every fastmask attention in ``module`` uses the explicit-math path (e.g. for
    double backward); the previous settings come back afterwards."""
    mods = list(iter_attention(module))
    old = [m.explicit_attention for m in mods]
    for m in mods:
        m.explicit_attention = enabled
    try:
        yield module
    finally:
        for m, o in zip(mods, old):
            m.explicit_attention = o
