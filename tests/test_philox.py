"""The torch Philox used by the references equals Triton's tl.randint4x bit for bit."""
import pytest
import torch
import triton
import triton.language as tl

from fastmask.philox import draw_seed, philox4x32
from helpers import DEVICE


@triton.jit
def _randint4x_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(seed, offs)
    m = offs < n
    tl.store(out_ptr + offs * 4 + 0, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int64), mask=m)


def test_philox_matches_triton_randint4x():
    n = 300
    for seed in (0, 1, 12345, 2**31 - 2, 2**40 + 7):
        out = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
        _randint4x_kernel[(triton.cdiv(n, 128),)](out, seed, n, BLOCK=128)
        ref = torch.stack(philox4x32(seed, torch.arange(n)), dim=1)
        # Triton's uint32 -> int64 cast may sign-extend; compare the low 32 bits.
        assert torch.equal(out.cpu() & 0xFFFFFFFF, ref), f"seed {seed}"
        assert ref.min() >= 0 and ref.max() < 2**32


def test_philox_outputs_look_uniform():
    r = philox4x32(7, torch.arange(1 << 16))[0].double() / 2**32
    assert abs(r.mean().item() - 0.5) < 0.01
    hist = torch.histc(r, bins=16, min=0, max=1)
    assert (hist / hist.sum() - 1 / 16).abs().max() < 0.01


def test_draw_seed_reproducible_and_validated():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert draw_seed(g1) == draw_seed(g2)
    assert draw_seed(seed=5) == 5
    import pytest

    with pytest.raises(ValueError, match="seed"):
        draw_seed(seed=-1)
    with pytest.raises(TypeError, match="generator"):
        draw_seed(generator=3)


def test_seed_from_generator_state_spreads_and_fits():
    # What a CUDA generator's seed draws reduce to (no GPU needed): a pure function of (seed, offset),
    # 31 bits, different for every offset step and every generator seed.
    from fastmask.philox import SEED_DRAW_OFFSET_STEP, seed_from_generator_state

    seeds = [seed_from_generator_state(s, k * SEED_DRAW_OFFSET_STEP) for s in (0, 1, 2**63) for k in range(2000)]
    assert all(0 <= v < 2**31 for v in seeds)
    assert len(set(seeds)) == len(seeds)
    assert seed_from_generator_state(7, 12) == seed_from_generator_state(7, 12)
    bits = torch.tensor(seeds[:2000])
    for bit in (0, 15, 30):  # each bit set about half the time
        assert abs(((bits >> bit) & 1).float().mean().item() - 0.5) < 0.05


@pytest.mark.gpu
def test_draw_seed_from_cuda_generator_needs_no_sync():
    g1 = torch.Generator(device="cuda").manual_seed(3)
    g2 = torch.Generator(device="cuda").manual_seed(3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        draws = [draw_seed(g1) for _ in range(50)]
        assert draws == [draw_seed(g2) for _ in range(50)], "reproducible from the generator's seed"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(set(draws)) == 50
    # The generator moved on, as a device draw would have moved it.
    assert g1.get_offset() == 50 * 4

