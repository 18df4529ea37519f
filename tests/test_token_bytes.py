"""Bytes moved by the token ops, forward and backward, against the minimum their contract needs.

Counted on the CPU (tests/bytecount.py: distinct bytes each Triton launch loads and stores, plus the
inputs and outputs of every other ATen op on the path), with the GPU tile shapes, at ViT-S (D=384)
and ViT-B (D=768) with N=196 patches, K=98 and 49 kept, bf16.  The minimum of each path is what it
must read and write at least: e.g. the gather backward with a positional embedding reads the output
gradient once and writes grad_x and grad_pos once.  Every path must stay within 1.1x of it.
"""
import pytest
import torch

from bytecount import count_bytes
from fastmask import ops

B, N = 8, 196  # a small batch keeps the interpreter fast; fixed per-op costs weigh more at small B
ELEM = 2  # bf16
IDS = 8  # int64
LIMIT = 1.1


@pytest.fixture(autouse=True)
def gpu_partials(monkeypatch):
    use_gpu_partials(monkeypatch)


def use_gpu_partials(monkeypatch):
    """Distinct bytes do not depend on the tile shapes, except for the [programs, D] partial sums of
    the fill / mask-token gradients: their row count is taken from the GPU tiles, the rest of the
    tile is the interpreter's (wide tiles: few interpreted programs, a fast test)."""
    from fastmask.kernels import token_gather as tg

    real_tile, real_gpu = tg._reduce_tile, tg._gpu_launch

    def tile(B, N, D, device, partial):
        batch, _, block_d, num_warps = real_tile(B, N, D, device, partial)
        tg._gpu_launch = lambda device: True
        try:
            rows = real_tile(B, N, D, device, partial)[1]
        finally:
            tg._gpu_launch = real_gpu
        return max(1, min(batch, tg._INTERPRETER_TILE_ELEMS // (rows * block_d))), rows, block_d, num_warps

    monkeypatch.setattr(tg, "_reduce_tile", tile)


def _ids(K, gen):
    return torch.stack([torch.sort(torch.randperm(N, generator=gen)[:K]).values for _ in range(B)])


def _minimum(op, mode, D, K, with_extra, ids):
    """Bytes the op must move: its inputs read once, its outputs written once (index/mask bytes included)."""
    row = D * ELEM
    if op == "gather":
        # the forward reads only the positions some row keeps; the backward writes all of grad_pos
        fwd = B * K * row * 2 + B * K * IDS + (torch.unique(ids).numel() * row if with_extra else 0)
        bwd = B * K * row + B * N * row + B * K * IDS + (N * row if with_extra else 0)
    elif op == "scatter":
        fwd = B * K * row + B * N * row + B * K * IDS + (row if with_extra else 0)
        # without a fill only the kept rows of the gradient are read; the fill's gradient reads all
        bwd = (B * N * row + row if with_extra else B * K * row) + B * K * row + B * K * IDS
    else:  # apply_mask_token: the hidden rows of x are never read
        masked = B * (N - K)
        fwd = (B * N - masked) * row + B * N * row + B * N + row
        bwd = B * N * row * 2 + B * N + row
    return fwd if mode == "fwd" else bwd


def _run(op, D, K, extra, gen):
    dtype = torch.bfloat16
    ids = _ids(K, gen)
    if op == "gather":
        x = torch.randn(B, N, D, generator=gen).to(dtype).requires_grad_(True)
        pos = torch.randn(1, N, D, generator=gen).to(dtype).requires_grad_(True) if extra else None
        fwd = lambda: ops.gather_tokens(x, ids, pos_embed=pos, backend="triton")  # noqa: E731
        leaves = (x, pos) if extra else (x,)
        out_shape = (B, K, D)
    elif op == "scatter":
        x = torch.randn(B, K, D, generator=gen).to(dtype).requires_grad_(True)
        fill = torch.randn(D, generator=gen).to(dtype).requires_grad_(True) if extra else None
        fwd = lambda: ops.scatter_tokens(x, ids, N, fill, backend="triton")  # noqa: E731
        leaves = (x, fill) if extra else (x,)
        out_shape = (B, N, D)
    else:
        x = torch.randn(B, N, D, generator=gen).to(dtype).requires_grad_(True)
        mask = torch.ones(B, N, dtype=torch.bool)
        mask.scatter_(1, ids, False)  # K visible tokens per row
        token = torch.randn(D, generator=gen).to(dtype).requires_grad_(True)
        fwd = lambda: ops.apply_mask_token(x, mask, token, backend="triton")  # noqa: E731
        leaves = (x, token)
        out_shape = (B, N, D)
    with ops.value_checks(False):
        counted_fwd = count_bytes(fwd)
        out = counted_fwd["result"]
        grad = torch.randn(out_shape, generator=gen).to(dtype)
        counted_bwd = count_bytes(lambda: torch.autograd.grad(out, leaves, grad))
    return counted_fwd, counted_bwd, ids


# ViT-S with K=98 (MAE 50%) and ViT-B with K=49 (75%), with the positional embedding / fill / mask
# token whose gradient is a batch reduction; the plain gather and scatter once each.
CASES = [(op, D, K, True) for op in ("gather", "scatter", "mask_token") for D, K in ((384, 98), (768, 49))]
CASES += [("gather", 384, 49, False), ("scatter", 768, 98, False)]


def byte_ratios(op, D, K, extra, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fwd, bwd, ids = _run(op, D, K, extra, gen)
    return {mode: counted["total"] / _minimum(op, mode, D, K, extra, ids)
            for mode, counted in (("fwd", fwd), ("bwd", bwd))}, fwd, bwd


@pytest.mark.slow
@pytest.mark.parametrize("op,D,K,extra", CASES)
def test_token_op_bytes_within_10_percent_of_the_minimum(op, D, K, extra):
    ratios, fwd, bwd = byte_ratios(op, D, K, extra)
    for mode, counted in (("fwd", fwd), ("bwd", bwd)):
        detail = ", ".join(f"{n} {b / 2**20:.2f} MiB" for n, b in counted["launches"] if b)
        assert ratios[mode] <= LIMIT, f"{op} {mode} D={D} K={K}: {ratios[mode]:.3f}x the minimum ({detail})"
        assert ratios[mode] >= 0.999, f"{op} {mode}: below the minimum ({ratios[mode]:.3f}x): the count is wrong"
