"""Plain-PyTorch reference implementations of every op: the specification.

The Triton (``fastmask.kernels``) and CUDA (``fastmask._C``) backends must match these; tests
compare them on random inputs.  Inputs are assumed valid here (``fastmask.ops`` checks them).
Gradients come from PyTorch's autograd through these expressions.

Numerics that the kernels reproduce exactly:
  * ``gather_tokens`` with ``pos_embed`` adds in float32 and rounds once to ``x.dtype``.
  * top-k orders rank by (score, then lower index first), so ties are deterministic.
  * random decisions come from ``fastmask.philox`` (see there for the streams), so every backend
    makes the same random choices for the same seed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .philox import philox4x32, seed_tensor


class MaskedTokens(NamedTuple):
    """Result of ``random_masking``.

    x_kept:      [B, K, D] the kept tokens, in original order
    mask:        [B, N] bool, True = hidden (dropped)
    ids_keep:    [B, K] int64, sorted ascending
    ids_restore: [B, N] int64; ``torch.gather(cat([x_kept, x_hidden], 1), 1, ids_restore)`` puts tokens
                 back in original order, where ``x_hidden`` lists the hidden tokens in ascending order
    """

    x_kept: torch.Tensor
    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


def _expand_ids(ids: torch.Tensor, dim: int) -> torch.Tensor:
    return ids.unsqueeze(-1).expand(-1, -1, dim)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor, pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, k] = x[b, ids[b, k]] (+ pos_embed[ids[b, k]])``."""
    if pos_embed is not None:
        x = (x.float() + pos_embed.reshape(1, x.shape[1], x.shape[2]).float()).to(x.dtype)
    # An id outside [0, N) (only with value checks off) reads a zero row, as the kernels do.
    valid = (ids >= 0) & (ids < x.shape[1])
    out = torch.gather(x, 1, _expand_ids(ids.clamp(0, x.shape[1] - 1), x.shape[-1]))
    return out.masked_fill_(~valid.unsqueeze(-1), 0)


def scatter_tokens(
    x_kept: torch.Tensor, ids: torch.Tensor, num_tokens: int, fill: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Inverse of gather: ``out[b, ids[b, k]] = x_kept[b, k]``; other rows are ``fill`` (or 0)."""
    B, _, D = x_kept.shape
    # An id outside [0, N) (only with value checks off) writes nothing, as the kernels do: it goes to
    # a spare row N that is cut off.
    spare = torch.where((ids >= 0) & (ids < num_tokens), ids, num_tokens)
    if fill is None:
        base = x_kept.new_zeros(B, num_tokens + 1, D)
    else:
        base = fill.to(x_kept.dtype).reshape(1, 1, D).expand(B, num_tokens + 1, D)
    return base.scatter(1, _expand_ids(spare, D), x_kept)[:, :num_tokens].contiguous()


def apply_mask_token(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """``where(mask, mask_token, x)`` with ``mask`` [B, N] (True = replace) and ``mask_token`` [D]."""
    return torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype).reshape(1, 1, -1), x)


def token_keys(seed, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Unique random int64 sort keys per token: ``philox lane 0 at offset b*N+n``, times N, plus n.

    ``seed``: an int or a one-element int64 tensor (see ``fastmask.philox``)."""
    offsets = torch.arange(batch * num_tokens, dtype=torch.int64, device=device).reshape(batch, num_tokens)
    r0 = philox4x32(seed, offsets)[0]
    return r0 * num_tokens + torch.arange(num_tokens, dtype=torch.int64, device=device)


def keep_count(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept by random masking: ``int(N * (1 - mask_ratio))`` (MAE's rounding)."""
    return int(num_tokens * (1 - mask_ratio))


def masks_from_keep(ids_keep: torch.Tensor, num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mask`` [B, N] (True = hidden) and ``ids_restore`` [B, N] from sorted ``ids_keep``."""
    B = ids_keep.shape[0]
    mask = torch.ones(B, num_tokens, dtype=torch.bool, device=ids_keep.device)
    mask.scatter_(1, ids_keep, False)
    # Kept tokens first, then hidden ones, each group in ascending token order.
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return mask, ids_restore


def random_keep(seed, batch: int, num_tokens: int, keep: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``fastmask::random_keep`` op: ``(ids_keep [B, K] sorted, mask [B, N], ids_restore [B, N])``
    keeping, per row, the ``keep`` tokens with the smallest random keys; on ``seed``'s device (a
    one-element int64 tensor; an int seed builds on the CPU)."""
    keys = token_keys(seed, batch, num_tokens, seed.device if isinstance(seed, torch.Tensor) else "cpu")
    ids_keep = torch.sort(torch.argsort(keys, dim=1)[:, :keep], dim=1).values
    mask, ids_restore = masks_from_keep(ids_keep, num_tokens)
    return ids_keep, mask, ids_restore


def random_masking(
    x: torch.Tensor, mask_ratio: float, seed, pos_embed: Optional[torch.Tensor] = None
) -> MaskedTokens:
    """MAE-style masking: keep the ``K = int(N*(1-mask_ratio))`` tokens with the smallest random keys
    (``random_keep``), then gather them (``gather_tokens``)."""
    B, N, _ = x.shape
    seed = seed.to(x.device) if isinstance(seed, torch.Tensor) else seed_tensor(seed=seed, device=x.device)
    ids_keep, mask, ids_restore = random_keep(seed, B, N, keep_count(N, mask_ratio))
    return MaskedTokens(gather_tokens(x, ids_keep, pos_embed), mask, ids_keep, ids_restore)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    return_cls_attn: bool = False,
    num_prefix_tokens: int = 1,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention computed in float32; optionally the head-mean CLS row over patch keys."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # float32 even under autocast: the contract says cls_attn is float32 and out is rounded once.
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.float()).to(q.dtype)
    if not return_cls_attn:
        return out
    cls_attn = probs[:, :, 0, num_prefix_tokens:].mean(dim=1).detach()
    return out, cls_attn


def rank_tokens(scores: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """``rank[b, n]``: position of token n when row b is ordered by score (descending if ``largest``),
    ties broken by the lower index first."""
    order = torch.sort(scores, dim=1, descending=largest, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank


def topk_tokens(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` highest (lowest) scores per row, sorted ascending; ties to the lower index."""
    order = torch.sort(scores, dim=1, descending=largest, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def counts_per_row(ratio: Union[float, torch.Tensor], num_tokens: int, batch: int, device) -> torch.Tensor:
    """``floor(ratio * N)`` per row as int64 [B], computed in float64 so floats and tensors agree."""
    if isinstance(ratio, torch.Tensor):
        return torch.floor(ratio.to(device=device, dtype=torch.float64) * num_tokens).to(torch.int64)
    return torch.full((batch,), int(ratio * num_tokens), dtype=torch.int64, device=device)


def gate_threshold(mask_prob: float) -> int:
    """A row is masked when its 32-bit gate draw is below this (so mask_prob=1 masks every row)."""
    return int(mask_prob * 2**32)


def cls_attention_mask(
    cls_attn: torch.Tensor,
    ratio_per_row: Optional[torch.Tensor],
    ratio: float,
    seed,
    mode: str = "high",
    mask_prob: float = 1.0,
    show_max: float = 0.1,
    show_ratio_per_row: Optional[torch.Tensor] = None,
    show_ratio: float = 0.0,
) -> torch.Tensor:
    """The ``fastmask::cls_attention_mask`` op: AttMask masks from a CLS attention map [B, N]; True = hidden.

    ``ratio_per_row`` ([B] float) when given, else ``ratio`` for every row (likewise ``show_ratio``);
    ``seed`` an int or a one-element int64 tensor.  See ``fastmask.ops.cls_attention_mask``.
    """
    B, N = cls_attn.shape
    device = cls_attn.device
    num_masked = counts_per_row(ratio if ratio_per_row is None else ratio_per_row, N, B, device)
    rank = rank_tokens(cls_attn, largest=(mode != "low"))
    mask = rank < num_masked[:, None]
    if mode == "hint":
        # Reveal show_ratio*N tokens drawn without replacement among the show_max*N most attended.
        candidates = rank < int(show_max * N)
        keys = token_keys(seed, B, N, device)
        keys = torch.where(candidates, keys, torch.iinfo(torch.int64).max)
        num_shown = counts_per_row(show_ratio if show_ratio_per_row is None else show_ratio_per_row, N, B, device)
        revealed = (rank_tokens(keys, largest=False) < num_shown[:, None]) & candidates
        mask = mask & ~revealed
    if mask_prob < 1.0:
        gate = philox4x32(seed, torch.arange(B, dtype=torch.int64, device=device))[1] < gate_threshold(mask_prob)
        mask = mask & gate[:, None]
    return mask
