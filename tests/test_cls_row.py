"""The one-launch CLS-row kernel (kernels/cls_row.py) against the reference's CLS map."""
import pytest
import torch

from fastmask import reference
from fastmask.kernels.cls_row import cls_row
from helpers import DEVICE, noncontiguous, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,L,Dh,prefix", [
    (2, 6, 197, 64, 1),    # ViT-S/16 at 224 px
    (2, 12, 37, 80, 1),    # 96 px local crop; Dh not a power of two
    (3, 3, 50, 48, 4),     # register tokens
    (1, 1, 2, 16, 1),      # one patch
    (2, 5, 65, 32, 65),    # every key a prefix token: an empty map
])
def test_cls_row_equals_the_reference(dtype, B, H, L, Dh, prefix):
    gen = torch.Generator().manual_seed(B * 1000 + L)
    q, k, v = (randn(B, H, L, Dh, dtype=dtype, generator=gen) * 2 for _ in range(3))
    scale = 0.7 * Dh ** -0.5
    _, ref = reference.attention(q, k, v, scale, True, prefix)
    got = cls_row(q, k, scale, prefix)
    assert got.dtype == torch.float32 and got.shape == (B, L - prefix)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7)


def test_cls_row_reads_strided_views():
    """timm's qkv.reshape(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4) views, and a non-contiguous Dh."""
    B, L, H, Dh = 2, 99, 6, 40
    qkv = randn(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    _, ref = reference.attention(q, k, v, None, True, 1)
    torch.testing.assert_close(cls_row(q, k, Dh ** -0.5, 1), ref, rtol=2e-5, atol=1e-7)
    q2, k2 = noncontiguous(q.contiguous()), noncontiguous(k.contiguous())
    torch.testing.assert_close(cls_row(q2, k2, Dh ** -0.5, 1), ref, rtol=2e-5, atol=1e-7)


def test_cls_row_is_one_launch_and_large_scores_stay_finite():
    from helpers import launched_kernels

    g = torch.Generator().manual_seed(0)  # its own inputs: the global RNG's state depends on which tests ran first
    q, k = randn(2, 6, 197, 64, generator=g) * 60, randn(2, 6, 197, 64, generator=g) * 60  # scores in the thousands
    got = cls_row(q, k, 64 ** -0.5, 1)
    _, ref = reference.attention(q, k, k, None, True, 1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert [n for n in launched_kernels(lambda: cls_row(q, k, 64 ** -0.5, 1)) if n.startswith("triton:")] == [
        "triton:_cls_row_kernel"]


def test_sdpa_with_the_cls_row_kernel_matches_the_reference_with_gradients():
    """What measured dispatch runs for SDPA candidates: SDPA's out (with its backward) + the kernel's map."""
    q, k, v = (randn(2, 6, 50, 32, requires_grad=True) for _ in range(3))
    from fastmask import library

    out, cls, _ = library._torch_attention(q, k, v, 32**-0.5, True, 1, sdpa_backend="MATH", cls_kernel=True)
    ref_out, ref_cls = reference.attention(q, k, v, None, True, 1)
    torch.testing.assert_close(cls, ref_cls, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert not cls.requires_grad
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref_out, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert DEVICE.type in ("cpu", "cuda")
