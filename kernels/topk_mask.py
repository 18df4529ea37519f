"""Top-k token selection and AttMask masks from a CLS attention map: one program per row.

Both ops reduce to one primitive, "which elements of this row are among the k smallest (key, index)
pairs": keys are uint32, ties go to the lower index.  Instead of sorting the row we find the k-th
smallest key by a most-significant-bit-first radix select (one count over the row per key bit below
the prefix every key shares, stopping once the count hits k exactly; at most 32 bits for float32
scores, 16 for float16/bfloat16), then take the lowest-indexed ties with one prefix sum.  The row
never leaves registers and the output is written once.

Keys:
  * scores -> uint32 whose unsigned order is the float order (flip all bits of negatives, set the
    sign bit of non-negatives; -0.0 is first turned into +0.0 because torch sorts them as equal);
    ``largest`` reverses the key order, so "k smallest keys" is always the question asked.
  * hint reveals -> ``philox lane 0 (seed, b*N + n)``; ordering (r0, n) is the same as ordering the
    reference's int64 key ``r0 * N + n``.

Everything matches ``fastmask.reference`` bit for bit (see ``reference.rank_tokens``); the CUDA
version lives in ``csrc/topk_mask.cu``.  ``topk_tokens`` and ``cls_attention_mask`` below are the Triton
implementations of the operators of those names (registered in ``fastmask/library.py``), with the
reference's arguments; inputs are assumed valid here (``fastmask.ops`` checks them).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import next_power_of_2

MODES = {"high": 0, "low": 1, "hint": 2}
_GATE_ALWAYS = 2**32  # gate_threshold at or above this masks every row: skip the gate draw


@triton.jit
def _order_keys(x, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr):
    """uint32 keys whose ascending order is the rank order (descending scores when LARGEST)."""
    # Integer work on the bit pattern only (a float compare may flush denormals on the GPU).
    # torch orders -0.0 and +0.0 as equal (then by index): fold -0.0 into +0.0 first.
    if KEY_BITS == 32:
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where((bits << 1) == 0, 0, bits)
        sign = bits >> 31  # arithmetic shift: all ones for negatives, zero otherwise
        key = bits ^ (sign | tl.full(bits.shape, -2147483648, tl.int32))
        if LARGEST:
            key = ~key  # on the int32 pattern: Triton's interpreter cannot invert a uint32 (3.8)
        ukey = key.to(tl.uint32, bitcast=True)
    else:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended half/bfloat16 pattern
        bits = tl.where((bits & 0x7FFF) == 0, 0, bits)
        sign = bits >> 31
        ukey = ((bits ^ (sign | 0x8000)) & 0xFFFF).to(tl.uint32)
        if LARGEST:
            ukey = ukey ^ 0xFFFF
    return ukey


@triton.jit
def _smallest_k(ukey, valid, k):
    """Mask of the valid elements among the k smallest (ukey, index) pairs of the row.

    k <= 0 selects nothing and k >= #valid selects every valid element.
    """
    # kth: the largest v with count(key < v) < k (then the k-th smallest key), built one bit at a
    # time from the most significant.  Two shortcuts, both exact:
    #  * the bits above the highest one where the smallest and largest valid key differ are shared by
    #    every key: start from that common prefix (its length is read off the float64 exponent of
    #    lo ^ hi), so a row of softmax probabilities skips its sign and most exponent bits;
    #  * stop as soon as count(key < trial) == k: the keys below trial are exactly the answer.
    # On float32 CLS maps this takes about 11-14 counting passes per row instead of 32.
    lo = tl.min(tl.where(valid, ukey, tl.full(ukey.shape, 0xFFFFFFFF, tl.uint32)), axis=0)
    hi = tl.max(tl.where(valid, ukey, tl.zeros(ukey.shape, tl.uint32)), axis=0)
    diff = lo ^ hi
    exponent = (diff.to(tl.float64).to(tl.int64, bitcast=True) >> 52) - 1023  # floor(log2(diff))
    top = tl.where(diff == 0, 0, exponent + 1).to(tl.int32)  # bits below the shared prefix
    kth = (lo.to(tl.int64) & ~((tl.full((), 1, tl.int64) << top.to(tl.int64)) - 1)).to(tl.uint32)
    bit = top - 1
    searching = bit >= 0
    while searching:
        trial = kth | (tl.full((), 1, tl.uint32) << bit.to(tl.uint32))
        below = tl.sum((valid & (ukey < trial)).to(tl.int32), axis=0)
        kth = tl.where(below <= k, trial, kth)
        bit -= 1
        searching = (bit >= 0) & (below != k)
    strictly_below = valid & (ukey < kth)
    ties = valid & (ukey == kth)
    # The remaining slots go to the lowest-indexed ties (the reference's stable sort order).
    room = k - tl.sum(strictly_below.to(tl.int32), axis=0)
    return strictly_below | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= room))


@triton.jit
def _topk_tokens_kernel(
    scores_ptr, ids_ptr, N, k, stride_b, stride_n,
    LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    x = tl.load(scores_ptr + row * stride_b + cols * stride_n, mask=valid, other=0)
    chosen = _smallest_k(_order_keys(x, LARGEST, KEY_BITS), valid, k)
    # Chosen tokens are written in index order: slot = number of chosen tokens before this one.
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(ids_ptr + row * k + slot, cols.to(tl.int64), mask=chosen)


@triton.jit
def _row_mask(
    x, valid, cols, row, seed, N, num_masked, num_candidates, num_shown,
    MODE: tl.constexpr, KEY_BITS: tl.constexpr,
):
    ukey = _order_keys(x, MODE != 1, KEY_BITS)
    hidden = _smallest_k(ukey, valid, num_masked)
    if MODE == 2:
        # Hints: reveal the num_shown candidates (the num_candidates most attended tokens) with the
        # smallest Philox keys (r0, n), i.e. a uniform draw without replacement.
        candidates = _smallest_k(ukey, valid, num_candidates)
        r0, _, _, _ = tl.randint4x(seed, (row * N + cols).to(tl.int32))
        revealed = _smallest_k(r0, candidates, num_shown)
        hidden = hidden & ~revealed
    return hidden


@triton.jit
def _row_count(ratio_ptr, stride, row, count, N, PER_ROW: tl.constexpr):
    """This row's token count: ``floor(float64(ratio[row]) * N)`` from a per-row ratio, else ``count``.

    Computed in float64 like ``reference.counts_per_row``, so the counts agree bit for bit; doing it
    here spares the four elementwise launches (cast, multiply, floor, cast) it costs in torch.
    """
    if PER_ROW:
        ratio = tl.load(ratio_ptr + row.to(tl.int64) * stride).to(tl.float64)
        return tl.floor(ratio * N).to(tl.int64)
    else:
        return count


# Values that can change from call to call (per-sample counts, gates): specialising on them (== 1,
# % 16) would recompile mid-training.  The seed is read from device memory (a replayed CUDA graph
# then uses the seed drawn in that replay).
@triton.jit(do_not_specialize=["gate_threshold", "num_masked", "num_shown"])
def _cls_attention_mask_kernel(
    attn_ptr, ratio_ptr, show_ptr, mask_ptr,
    seed_ptr, gate_threshold, N, num_masked, num_candidates, num_shown, stride_b, stride_n, stride_ratio, stride_show,
    MODE: tl.constexpr, GATED: tl.constexpr, RATIO_PER_ROW: tl.constexpr, SHOW_PER_ROW: tl.constexpr,
    KEY_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < N
    hidden = tl.zeros([BLOCK], dtype=tl.int1)
    seed = tl.load(seed_ptr)
    if GATED:
        # Row gate: philox lane 1 at offset b, compared as an integer (threshold may be 2**32).
        _, gate, _, _ = tl.randint4x(seed, row)
        masked_row = (gate.to(tl.int64) & 0xFFFFFFFF) < gate_threshold
    else:
        masked_row = True
    if masked_row:  # gated-off rows skip the selection entirely
        x = tl.load(attn_ptr + row.to(tl.int64) * stride_b + cols * stride_n, mask=valid, other=0)
        row_masked = _row_count(ratio_ptr, stride_ratio, row, num_masked, N, RATIO_PER_ROW)
        row_shown = _row_count(show_ptr, stride_show, row, num_shown, N, SHOW_PER_ROW)
        hidden = _row_mask(x, valid, cols, row, seed, N, row_masked, num_candidates, row_shown, MODE, KEY_BITS)
    # Every element of every row is written (gated-off rows as zeros): the output needs no memset.
    tl.store(mask_ptr + row.to(tl.int64) * N + cols, hidden.to(tl.uint8), mask=valid)


def _launch_config(num_tokens: int):
    block = next_power_of_2(num_tokens)
    # One row per program; a warp per 512 elements keeps the per-bit counts mostly inside warps.
    return block, max(1, min(8, block // 512))


def _key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def topk_tokens(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """[B, k] int64 indices of each row's k largest (smallest) scores, ascending; ties to the lower index."""
    B, N = scores.shape
    ids = torch.empty(B, k, dtype=torch.int64, device=scores.device)
    if B == 0 or k == 0:
        return ids
    block, num_warps = _launch_config(N)
    wrap_triton(_topk_tokens_kernel)[(B,)](
        scores, ids, N, k, scores.stride(0), scores.stride(1),
        LARGEST=bool(largest), KEY_BITS=_key_bits(scores.dtype), BLOCK=block, num_warps=num_warps,
    )
    return ids


def _per_row(ratio: Optional[torch.Tensor], like: torch.Tensor):
    """(pointer tensor, stride, per-row flag) for a per-row ratio tensor or one count for every row."""
    if ratio is None:
        return like, 0, False  # any pointer: the kernel does not read it
    return ratio, ratio.stride(0), True


def cls_attention_mask(
    cls_attn: torch.Tensor,
    ratio_per_row: Optional[torch.Tensor],
    ratio: float,
    seed: torch.Tensor,
    mode: str,
    mask_prob: float,
    show_max: float,
    show_ratio_per_row: Optional[torch.Tensor],
    show_ratio: float,
) -> torch.Tensor:
    """AttMask mask [B, N] bool (True = hidden), bit-identical to ``reference.cls_attention_mask``.

    Per-row counts: ``floor(float64(ratio_per_row[b]) * N)`` hidden and likewise revealed when the [B]
    float tensors are given (computed in the kernel), else ``int(ratio * N)`` / ``int(show_ratio * N)``
    for every row.  Rows whose Philox gate draw is below ``int(mask_prob * 2**32)`` are masked; the
    hint pool holds ``int(show_max * N)`` tokens.  One launch, no host sync.
    """
    B, N = cls_attn.shape
    gate_threshold = int(mask_prob * 2**32)  # reference.gate_threshold
    if B == 0 or N == 0 or gate_threshold <= 0:
        return torch.zeros(B, N, dtype=torch.bool, device=cls_attn.device)
    ratio_arg, stride_ratio, ratio_per_row_flag = _per_row(ratio_per_row, cls_attn)
    hint = mode == "hint"
    show_arg, stride_show, show_per_row_flag = _per_row(show_ratio_per_row if hint else None, cls_attn)
    mask = torch.empty(B, N, dtype=torch.uint8, device=cls_attn.device)
    block, num_warps = _launch_config(N)
    wrap_triton(_cls_attention_mask_kernel)[(B,)](
        cls_attn, ratio_arg, show_arg, mask,
        seed, gate_threshold, N, int(ratio * N), int(show_max * N), int(show_ratio * N) if hint else 0,
        cls_attn.stride(0), cls_attn.stride(1), stride_ratio, stride_show,
        MODE=MODES[mode], GATED=gate_threshold < _GATE_ALWAYS, RATIO_PER_ROW=ratio_per_row_flag,
        SHOW_PER_ROW=show_per_row_flag, KEY_BITS=_key_bits(cls_attn.dtype), BLOCK=block, num_warps=num_warps,
    )
    return mask.view(torch.bool)
