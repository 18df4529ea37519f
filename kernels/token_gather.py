"""Token gather / scatter, MAE random masking and mask-token replacement (Triton and CUDA backends).

Every op here moves whole token rows of ``D`` channels, so each is one pass over memory: a program
owns a ``[ROWS, BLOCK_D]`` tile of output rows, resolves which source row (or fill vector) feeds each
output row from a small index, and copies it with wide loads/stores along ``D``.  The tile width is a
power of two with masking, so any ``D`` (e.g. 390) works; strides are passed, so non-contiguous inputs
need no copy (contiguous ``D`` lets Triton emit 16-byte vector accesses).

Scatter runs over *output* rows: a tiny pre-pass writes ``slot[b, n]`` (which kept row lands on token
``n``, or -1), so every output row is written exactly once and the fill needs no separate pass.

``random_keep`` reproduces ``fastmask.reference.random_masking``'s choice bit for bit: the key of token
``(b, n)`` is ``philox lane 0 (seed, offset=b*N+n) * N + n`` (unique, so there are no ties); a row
keeps its ``K`` smallest keys.  One program per row holds its keys in registers, finds the K-th
smallest by bisecting its value (a few dozen row reductions, no sort), keeps the keys at or below it
and lays out ``ids_keep``/``ids_restore`` with prefix sums.  (The CUDA kernel bitonic-sorts the keys
in shared memory instead; both give the same K tokens.)

The entry points at the bottom are the Triton implementations of the operators ``fastmask::gather_tokens``,
``scatter_tokens``, ``apply_mask_token`` and ``random_keep`` (``fastmask/library.py`` registers them, with
their fakes and backwards): same arguments as the reference, valid input assumed (``fastmask.ops`` checks
it).  Launches go through ``torch.library.wrap_triton``, so ``torch.compile`` sees the kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import cdiv, next_power_of_2

# Elements per program tile: enough bytes in flight per program to stream at copy bandwidth, small
# enough to keep registers (and the interpreter) cheap.
_TILE_ELEMS = 4096
_MAX_BLOCK_D = 1024
_INTERPRETER_TILE_ELEMS = 1 << 15


def _block_d(D: int) -> int:
    """Tile width along D: the widest power of two >= 128 that tiles D exactly (768 -> 256), else
    the next power of two (390 -> 512; masked lanes cost issue slots, not memory traffic)."""
    width = _MAX_BLOCK_D
    while width >= 128:
        if D % width == 0:
            return width
        width //= 2
    return min(next_power_of_2(D), _MAX_BLOCK_D)


def _gpu_launch(device: torch.device) -> bool:
    """GPU tile shapes for tensors on ``device`` (else the interpreter's); one switch, so that
    ``tests/compile_for_gpu.py`` can compile the GPU configuration from CPU tensors."""
    return device.type == "cuda"


def _row_tile(D: int, device: torch.device) -> Tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) for a row-copy kernel over rows of D channels."""
    if not _gpu_launch(device):
        # The CPU interpreter pays per program, not per masked lane: one wide tile per group of rows.
        block_d = next_power_of_2(D)
        return max(1, min(64, _INTERPRETER_TILE_ELEMS // block_d)), block_d, 4
    block_d = _block_d(D)
    rows = max(1, min(16, _TILE_ELEMS // block_d))
    num_warps = 4 if rows * block_d <= 2048 else 8
    return rows, block_d, num_warps


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _round_float32_to(vals, dtype: tl.constexpr):
    """Round float32 to ``dtype`` to nearest-even, as torch's ``.to(dtype)`` does.

    bfloat16 is rounded by hand on the bit pattern: the Triton CPU interpreter truncates
    float32 -> bfloat16, which would make interpreter results differ from the GPU and from torch.
    """
    if dtype == tl.bfloat16:
        bits = vals.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN must stay NaN (rounding could carry its payload into infinity): keep it quiet instead.
        half = tl.where(vals != vals, (bits >> 16) | 0x40, rounded)
        return half.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return vals.to(dtype)


@triton.jit
def _output_rows(num_rows, per_sample, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of output rows (flattened ``b * per_sample + i``) and channels:
    ``(rows, cols, row_ok, b, i)``, with b and i in int64."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    return rows, cols, row_ok, (rows // per_sample).to(tl.int64), (rows % per_sample).to(tl.int64)


@triton.jit
def _copy_rows_or_fill(src_ptr, src_row, from_src, fill_ptr, out_ptr, b, n, cols, row_ok, D,
                       stride_sb, stride_sn, stride_sd, stride_ob, stride_on, HAS_FILL: tl.constexpr):
    """out[b, n, :] = src[b, src_row, :] where ``from_src``, else the fill vector (or 0)."""
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    # Filled rows never read the source: the masked load costs no memory traffic.
    vals = tl.load(src_ptr + (b * stride_sb + src_row * stride_sn)[:, None] + cols[None, :] * stride_sd,
                   mask=m & from_src[:, None], other=0.0)
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=col_ok, other=0.0)
        vals = tl.where(from_src[:, None], vals, fill[None, :])
    tl.store(out_ptr + (b * stride_ob + n * stride_on)[:, None] + cols[None, :],
             vals.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gather_rows_kernel(
    src_ptr, ids_ptr, pos_ptr, out_ptr,
    num_rows, K, D, N,
    stride_sb, stride_sn, stride_sd,
    stride_ib, stride_ik,
    stride_pn, stride_pd,
    stride_ob, stride_ok,
    HAS_POS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, k, :] = src[b, ids[b, k], :] (+ pos[ids[b, k], :] added in float32); an id outside
    [0, N) (value checks off) gives a zero row, never a read out of bounds."""
    rows, cols, row_ok, b, k = _output_rows(num_rows, K, ROWS, BLOCK_D)
    token = tl.load(ids_ptr + b * stride_ib + k * stride_ik, mask=row_ok, other=0)
    m = row_ok[:, None] & (cols < D)[None, :]
    read = m & ((token >= 0) & (token < N))[:, None]
    vals = tl.load(src_ptr + (b * stride_sb + token * stride_sn)[:, None] + cols[None, :] * stride_sd, mask=read,
                   other=0.0)
    if HAS_POS:
        # Same numerics as the reference: add in float32, round once to the output dtype.
        pos = tl.load(pos_ptr + (token * stride_pn)[:, None] + cols[None, :] * stride_pd, mask=read, other=0.0)
        vals = _round_float32_to(vals.to(tl.float32) + pos.to(tl.float32), out_ptr.dtype.element_ty)
    tl.store(out_ptr + (b * stride_ob + k * stride_ok)[:, None] + cols[None, :], vals, mask=m)


@triton.jit
def _token_slots_kernel(ids_ptr, slot_ptr, N, K, stride_ib, stride_ik, BLOCK: tl.constexpr):
    """slot[b, n] = k where ids[b, k] == n, else -1 (one program per row b); ids outside [0, N)
    (value checks off) are dropped, never written out of bounds."""
    b = tl.program_id(0).to(tl.int64)
    for n0 in range(0, N, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        tl.store(slot_ptr + b * N + n, tl.full([BLOCK], -1, tl.int32), mask=n < N)
    # The -1 stores above and the k stores below may hit one address from different threads.
    tl.debug_barrier()
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        token = tl.load(ids_ptr + b * stride_ib + k * stride_ik, mask=k < K, other=0)
        tl.store(slot_ptr + b * N + token, k.to(tl.int32), mask=(k < K) & (token >= 0) & (token < N))


@triton.jit
def _scatter_rows_kernel(
    src_ptr, slot_ptr, fill_ptr, out_ptr,
    num_rows, N, D,
    stride_sb, stride_sk, stride_sd,
    stride_ob, stride_on,
    HAS_FILL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, n, :] = src[b, slot[b, n], :] when slot >= 0, else fill (or 0)."""
    rows, cols, row_ok, b, n = _output_rows(num_rows, N, ROWS, BLOCK_D)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    _copy_rows_or_fill(src_ptr, slot, slot >= 0, fill_ptr, out_ptr, b, n, cols, row_ok, D,
                       stride_sb, stride_sk, stride_sd, stride_ob, stride_on, HAS_FILL)


@triton.jit
def _mask_token_kernel(
    x_ptr, mask_ptr, token_ptr, out_ptr,
    num_rows, N, D,
    stride_xb, stride_xn, stride_xd,
    stride_ob, stride_on,
    HAS_TOKEN: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, n, :] = token if mask[b, n] else x[b, n, :] (token 0 when HAS_TOKEN is False: backward)."""
    rows, cols, row_ok, b, n = _output_rows(num_rows, N, ROWS, BLOCK_D)
    visible = tl.load(mask_ptr + rows, mask=row_ok, other=0) == 0
    _copy_rows_or_fill(x_ptr, n, visible, token_ptr, out_ptr, b, n, cols, row_ok, D,
                       stride_xb, stride_xn, stride_xd, stride_ob, stride_on, HAS_TOKEN)


# Backward kernels that fuse the batch reductions (pos-embed, fill and mask-token gradients): a program
# owns [ROWS tokens, BLOCK_D channels] and walks the whole batch, BATCH samples at a time, so each
# gradient row is read once, written once, and summed in float32 registers on the way.

@triton.jit
def _token_tile(N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tokens and channels: ``(n, cols, tile_ok)``."""
    n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return n, cols, (n < N)[:, None] & (cols < D)[None, :]


@triton.jit
def _batch_slice(b0, B, n, N, BATCH: tl.constexpr):
    """Samples ``b0 .. b0 + BATCH - 1`` of the tile: ``(b, row_ok)``, row_ok [BATCH, ROWS]."""
    b = (b0 + tl.arange(0, BATCH)).to(tl.int64)
    return b, (b < B)[:, None] & (n < N)[None, :]


@triton.jit
def _strided_ptrs(ptr, b, rows, cols, stride_b, stride_r, stride_d):
    """[BATCH, ROWS, BLOCK_D] pointers to rows ``rows`` [BATCH, ROWS] of the samples b of a strided [B, R, D]."""
    return ptr + (b[:, None] * stride_b + rows * stride_r)[:, :, None] + cols[None, None, :] * stride_d


@triton.jit
def _dense_ptrs(ptr, b, rows, num_rows, D, cols):
    """The same into a contiguous [B, num_rows, D]."""
    return ptr + ((b[:, None] * num_rows + rows) * D)[:, :, None] + cols[None, None, :]

@triton.jit
def _gather_backward_kernel(
    grad_ptr, slot_ptr, grad_x_ptr, grad_pos_ptr,
    B, N, D,
    stride_gb, stride_gk, stride_gd,
    NEED_X: tl.constexpr, BATCH: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_x[b, n] = grad[b, slot[b, n]] (0 where slot < 0); grad_pos[n] = sum_b grad_x[b, n] (float32)."""
    n, cols, tile_ok = _token_tile(N, D, ROWS, BLOCK_D)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BATCH):
        b, row_ok = _batch_slice(b0, B, n, N, BATCH)
        slot = tl.load(slot_ptr + b[:, None] * N + n[None, :], mask=row_ok, other=-1).to(tl.int64)
        ok = row_ok[:, :, None] & tile_ok[None, :, :]
        src = _strided_ptrs(grad_ptr, b, slot, cols, stride_gb, stride_gk, stride_gd)
        vals = tl.load(src, mask=ok & (slot >= 0)[:, :, None], other=0.0)
        if NEED_X:
            tl.store(_dense_ptrs(grad_x_ptr, b, n[None, :], N, D, cols), vals, mask=ok)
        acc += tl.sum(vals.to(tl.float32), 0)
    tl.store(grad_pos_ptr + n[:, None] * D + cols[None, :], _round_float32_to(acc, grad_pos_ptr.dtype.element_ty),
             mask=tile_ok)


@triton.jit
def _scatter_backward_kernel(
    grad_ptr, slot_ptr, grad_x_ptr, partial_ptr,
    B, N, K, D,
    stride_gb, stride_gn, stride_gd,
    NEED_X: tl.constexpr, BATCH: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_x[b, slot[b, n]] = grad[b, n] for kept tokens; partial[program row, :] = the sum of grad over
    this program's hidden (b, n) (the fill's gradient, summed over programs afterwards)."""
    n, cols, tile_ok = _token_tile(N, D, ROWS, BLOCK_D)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BATCH):
        b, row_ok = _batch_slice(b0, B, n, N, BATCH)
        slot = tl.load(slot_ptr + b[:, None] * N + n[None, :], mask=row_ok, other=-1).to(tl.int64)
        kept = (slot >= 0)[:, :, None]
        ok = row_ok[:, :, None] & tile_ok[None, :, :]
        vals = tl.load(_strided_ptrs(grad_ptr, b, n[None, :], cols, stride_gb, stride_gn, stride_gd), mask=ok, other=0.0)
        if NEED_X:
            dst = _dense_ptrs(grad_x_ptr, b, slot, K, D, cols)
            tl.store(dst, vals, mask=ok & kept)
        acc += tl.sum(tl.where(kept, 0.0, vals.to(tl.float32)), 0)
    tl.store(partial_ptr + tl.program_id(0) * D + cols, tl.sum(acc, 0), mask=cols < D)


@triton.jit
def _mask_token_backward_kernel(
    grad_ptr, mask_ptr, grad_x_ptr, partial_ptr,
    B, N, D,
    stride_gb, stride_gn, stride_gd,
    NEED_X: tl.constexpr, BATCH: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_x[b, n] = 0 if mask[b, n] else grad[b, n]; partial[program row, :] = the sum of grad over
    this program's hidden (b, n) (the mask token's gradient, summed over programs afterwards)."""
    n, cols, tile_ok = _token_tile(N, D, ROWS, BLOCK_D)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BATCH):
        b, row_ok = _batch_slice(b0, B, n, N, BATCH)
        hidden = (tl.load(mask_ptr + b[:, None] * N + n[None, :], mask=row_ok, other=0) != 0)[:, :, None]
        ok = row_ok[:, :, None] & tile_ok[None, :, :]
        vals = tl.load(_strided_ptrs(grad_ptr, b, n[None, :], cols, stride_gb, stride_gn, stride_gd), mask=ok, other=0.0)
        if NEED_X:
            tl.store(_dense_ptrs(grad_x_ptr, b, n[None, :], N, D, cols),
                     tl.where(hidden, 0.0, vals).to(grad_x_ptr.dtype.element_ty), mask=ok)
        acc += tl.sum(tl.where(hidden, vals.to(tl.float32), 0.0), 0)
    tl.store(partial_ptr + tl.program_id(0) * D + cols, tl.sum(acc, 0), mask=cols < D)


@triton.jit
def _random_keep_kernel(ids_keep_ptr, mask_ptr, ids_restore_ptr, seed_ptr, B, N, K,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """ROWS rows b: each keeps the K tokens with the smallest Philox keys (see the module docstring).

    On a GPU ROWS is 1 (a row per program); the CPU interpreter batches rows to amortise its per-op cost.
    The seed is read from device memory, so a replayed CUDA graph uses the seed drawn in that replay.
    """
    seed = tl.load(seed_ptr)
    b = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n = tl.arange(0, BLOCK_N)
    valid = (b < B)[:, None] & (n < N)[None, :]
    r0, _, _, _ = tl.randint4x(seed, b[:, None] * N + n[None, :])
    # Triton may sign-extend the uint32 draw when widening; keep its low 32 bits.
    draw = r0.to(tl.int64) & 0xFFFFFFFF
    keys = tl.where(valid, draw * N + n[None, :], 9223372036854775807)
    # The K-th smallest key, by bisection on its value: keys lie in [0, N * 2**32) and each step
    # counts the keys <= mid (a row reduction), so no sort is needed.  Keys are unique, so
    # "key <= K-th smallest" keeps exactly K tokens; K == 0 keeps none.
    lo = tl.full([ROWS], -1, tl.int64)
    hi = (tl.full([ROWS], 0, tl.int64) + N) << 32
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) >> 1
        enough = tl.sum((keys <= mid[:, None]).to(tl.int32), axis=1) >= K
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid)
    threshold = tl.where(K > 0, hi, -1)
    kept = (keys <= threshold[:, None]) & valid
    hidden = (~kept) & valid
    kept_before = tl.cumsum(kept.to(tl.int32), axis=1) - 1
    hidden_before = tl.cumsum(hidden.to(tl.int32), axis=1) - 1
    # Kept tokens come first in ascending order, then the hidden ones: ids_restore inverts that list.
    restore = tl.where(kept, kept_before, K + hidden_before).to(tl.int64)
    row = b.to(tl.int64)[:, None]
    token = n.to(tl.int64)[None, :]
    tl.store(ids_keep_ptr + row * K + kept_before, token + row * 0, mask=kept)
    tl.store(mask_ptr + row * N + token, hidden.to(tl.uint8), mask=valid)
    tl.store(ids_restore_ptr + row * N + token, restore, mask=valid)


# --------------------------------------------------------------------------------------------
# launchers: the Triton implementations of the fastmask:: operators (registered in fastmask/library.py)
# --------------------------------------------------------------------------------------------

def gather_tokens(x: torch.Tensor, ids: torch.Tensor, pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, K, D] = x[b, ids[b, k]] (+ pos_embed[ids[b, k]] in float32); see fastmask.ops.gather_tokens."""
    B, N, D = x.shape
    K = ids.shape[1]
    pos = None if pos_embed is None else pos_embed.reshape(N, D)
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows, block_d, num_warps = _row_tile(D, out.device)
    grid = (cdiv(B * K, rows), cdiv(D, block_d))
    wrap_triton(_gather_rows_kernel)[grid](
        x, ids, pos if pos is not None else x, out,
        B * K, K, D, N,
        x.stride(0), x.stride(1), x.stride(2),
        ids.stride(0), ids.stride(1),
        pos.stride(0) if pos is not None else 0, pos.stride(1) if pos is not None else 0,
        out.stride(0), out.stride(1),
        HAS_POS=pos is not None, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def _token_slots(ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    B, K = ids.shape
    slot = torch.empty(B, num_tokens, dtype=torch.int32, device=ids.device)
    block = min(next_power_of_2(num_tokens), 1024)
    wrap_triton(_token_slots_kernel)[(B,)](ids, slot, num_tokens, K, ids.stride(0), ids.stride(1), BLOCK=block)
    return slot


def scatter_tokens(x_kept: torch.Tensor, ids: torch.Tensor, num_tokens: int,
                   fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, N, D] with rows ids[b, k] = x_kept[b, k], others fill (or 0); see fastmask.ops.scatter_tokens."""
    B, K, D = x_kept.shape
    fill_vec = None if fill is None else fill.reshape(D).to(x_kept.dtype).contiguous()
    out = torch.empty(B, num_tokens, D, dtype=x_kept.dtype, device=x_kept.device)
    if out.numel() == 0:
        return out
    slot = _token_slots(ids, num_tokens)
    rows, block_d, num_warps = _row_tile(D, out.device)
    grid = (cdiv(B * num_tokens, rows), cdiv(D, block_d))
    wrap_triton(_scatter_rows_kernel)[grid](
        x_kept, slot, fill_vec if fill_vec is not None else out, out,
        B * num_tokens, num_tokens, D,
        x_kept.stride(0), x_kept.stride(1), x_kept.stride(2),
        out.stride(0), out.stride(1),
        HAS_FILL=fill_vec is not None, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def apply_mask_token(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """where(mask, mask_token, x) over rows; see fastmask.ops.apply_mask_token."""
    B, N, D = x.shape
    out = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    mask_u8 = mask.contiguous().view(torch.uint8)
    token_vec = mask_token.reshape(D).to(x.dtype).contiguous()
    rows, block_d, num_warps = _row_tile(D, out.device)
    grid = (cdiv(B * N, rows), cdiv(D, block_d))
    wrap_triton(_mask_token_kernel)[grid](
        x, mask_u8, token_vec, out,
        B * N, N, D,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1),
        HAS_TOKEN=True, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def _reduce_tile(B: int, N: int, D: int, device: torch.device, partial: bool) -> Tuple[int, int, int, int]:
    """(BATCH, ROWS, BLOCK_D, num_warps) for the backward kernels that sum over the batch.

    Without a partial-sum buffer (the pos-embed gradient is per token) programs own 2 tokens, enough of
    them to fill the GPU; with one (fill / mask-token gradients) 16 tokens, so that the [programs, D]
    float32 partials stay ~1% of the traffic even at small batches.
    """
    if not _gpu_launch(device):
        block_d = next_power_of_2(D)
        rows = max(1, min(next_power_of_2(N), _INTERPRETER_TILE_ELEMS // block_d))
        return max(1, min(next_power_of_2(B), _INTERPRETER_TILE_ELEMS // (rows * block_d))), rows, block_d, 4
    block_d = min(_block_d(D), 256)
    rows = 16 if partial else 2
    # 8 warps for the partial kinds: their [16, BLOCK_D] float32 accumulator alone is 32 registers per
    # thread at 4 warps (~185 in all on sm_90, 12% occupancy); 8 warps halve what each thread holds.
    return max(1, _TILE_ELEMS // (rows * block_d)), rows, block_d, 8 if partial else 4


def gather_tokens_backward(grad_out: torch.Tensor, ids: torch.Tensor, num_tokens: int, need_x: bool, pos_dtype):
    """(grad_x [B, N, D] or None, grad_pos [N, D]) of gather_tokens(x, ids, pos_embed), in one pass."""
    B, K, D = grad_out.shape
    grad_x = torch.empty(B, num_tokens, D, dtype=grad_out.dtype, device=grad_out.device) if need_x else None
    grad_pos = torch.empty(num_tokens, D, dtype=pos_dtype, device=grad_out.device)
    if grad_pos.numel() == 0 or B == 0:
        return (None if grad_x is None else grad_x.zero_()), grad_pos.zero_()
    slot = _token_slots(ids, num_tokens)
    batch, rows, block_d, num_warps = _reduce_tile(B, num_tokens, D, grad_out.device, partial=False)
    wrap_triton(_gather_backward_kernel)[(cdiv(num_tokens, rows), cdiv(D, block_d))](
        grad_out, slot, grad_x if need_x else grad_out, grad_pos,
        B, num_tokens, D,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        NEED_X=need_x, BATCH=batch, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return grad_x, grad_pos


def scatter_tokens_backward(grad_out: torch.Tensor, ids: torch.Tensor, need_x: bool, fill_dtype):
    """(grad_x_kept [B, K, D] or None, grad_fill [D]) of scatter_tokens(x_kept, ids, N, fill), in one pass."""
    B, N, D = grad_out.shape
    K = ids.shape[1]
    grad_x = torch.empty(B, K, D, dtype=grad_out.dtype, device=grad_out.device) if need_x else None
    if B * N * D == 0:
        return grad_x, torch.zeros(D, dtype=fill_dtype, device=grad_out.device)
    slot = _token_slots(ids, N)
    batch, rows, block_d, num_warps = _reduce_tile(B, N, D, grad_out.device, partial=True)
    partial = torch.empty(cdiv(N, rows), D, dtype=torch.float32, device=grad_out.device)
    wrap_triton(_scatter_backward_kernel)[(cdiv(N, rows), cdiv(D, block_d))](
        grad_out, slot, grad_x if need_x else grad_out, partial,
        B, N, K, D,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        NEED_X=need_x, BATCH=batch, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return grad_x, partial.sum(0).to(fill_dtype)


def apply_mask_token_backward(grad_out: torch.Tensor, mask: torch.Tensor, need_x: bool, token_dtype):
    """(grad_x [B, N, D] or None, grad_token [D]) of apply_mask_token(x, mask, token), in one pass."""
    B, N, D = grad_out.shape
    grad_x = torch.empty(B, N, D, dtype=grad_out.dtype, device=grad_out.device) if need_x else None
    if B * N * D == 0:
        return grad_x, torch.zeros(D, dtype=token_dtype, device=grad_out.device)
    batch, rows, block_d, num_warps = _reduce_tile(B, N, D, grad_out.device, partial=True)
    partial = torch.empty(cdiv(N, rows), D, dtype=torch.float32, device=grad_out.device)
    wrap_triton(_mask_token_backward_kernel)[(cdiv(N, rows), cdiv(D, block_d))](
        grad_out, mask.contiguous().view(torch.uint8), grad_x if need_x else grad_out, partial,
        B, N, D,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        NEED_X=need_x, BATCH=batch, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return grad_x, partial.sum(0).to(token_dtype)


def random_keep(seed: torch.Tensor, batch: int, num_tokens: int, keep: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep [B, K] sorted, mask [B, N] True = hidden, ids_restore [B, N]) on ``seed``'s device,
    bit-identical to ``fastmask.reference.random_keep`` for the same seed (a one-element int64 tensor)."""
    if batch * num_tokens > 2**31 - 1:
        raise ValueError("random_keep draws one 32-bit Philox counter per token: B*N must stay below 2**31")
    device = seed.device
    ids_keep = torch.empty(batch, keep, dtype=torch.int64, device=device)
    mask = torch.empty(batch, num_tokens, dtype=torch.bool, device=device)
    ids_restore = torch.empty(batch, num_tokens, dtype=torch.int64, device=device)
    if batch == 0 or num_tokens == 0:
        return ids_keep, mask, ids_restore
    block_n = next_power_of_2(num_tokens)
    if _gpu_launch(device):
        rows, num_warps = 1, 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16
    else:
        rows, num_warps = min(next_power_of_2(batch), max(1, 4096 // block_n)), 4
    wrap_triton(_random_keep_kernel)[(cdiv(batch, rows),)](
        ids_keep, mask.view(torch.uint8), ids_restore, seed, batch, num_tokens, keep,
        ROWS=rows, BLOCK_N=block_n, SEARCH_STEPS=(block_n << 32).bit_length(), num_warps=num_warps,
    )
    return ids_keep, mask, ids_restore
