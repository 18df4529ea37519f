"""fastmask.ops.attention (Triton kernel in kernels/cls_attention.py) against the PyTorch reference.

On the CPU the kernels run under the Triton interpreter (fixed 32x32 blocks, 16-row tail tiles), so the shapes are
small but deliberately awkward: lengths that are not multiples of the block (1, 2, 17, 50, 65, 197),
head dims that are not powers of two (48), 1-3 batches and heads, prefix tokens 1 and 2, strided
views like timm's qkv split.  The GPU tests at the end check ViT shapes against the reference and
against ``F.scaled_dot_product_attention``.
"""
import pytest
import torch
import torch.nn.functional as F

from fastmask import ops, reference
from helpers import DEVICE, HAS_CUDA, noncontiguous

TRITON = "triton"

# Output tolerances: fp32 is exact up to summation order; fp16/bf16 round the probabilities to the
# input dtype before the P@V product (as FlashAttention does) and the output once more at the end.
OUT_TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
# Gradients additionally round dS to the input dtype before two dots.
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
# cls_attn is computed in float32 from the exact products of the inputs, whatever their dtype.
CLS_TOL = dict(rtol=1e-4, atol=1e-6)


def qkv(B, H, L, Dh, dtype, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, H, L, Dh, generator=gen).to(DEVICE, dtype).requires_grad_(requires_grad) for _ in range(3)
    ]


def timm_qkv(B, H, L, Dh, dtype, seed, requires_grad=False):
    """q, k, v as timm's Attention produces them: strided views of one [B, L, 3*H*Dh] projection."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 3 * H * Dh, generator=gen).to(DEVICE, dtype).requires_grad_(requires_grad)
    q, k, v = x.reshape(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    return x, q, k, v


def check_forward(q, k, v, *, scale=None, num_prefix_tokens=1):
    out, cls_attn = ops.attention(
        q, k, v, scale=scale, return_cls_attn=True, num_prefix_tokens=num_prefix_tokens, backend=TRITON
    )
    ref_out, ref_cls = reference.attention(q, k, v, scale, True, num_prefix_tokens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert cls_attn.shape == (q.shape[0], q.shape[2] - num_prefix_tokens) and cls_attn.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **OUT_TOL[q.dtype])
    torch.testing.assert_close(cls_attn, ref_cls, **CLS_TOL)
    return out, cls_attn


@pytest.mark.parametrize(
    "B,H,L,Dh,dtype",
    [
        (1, 1, 1, 32, torch.float32),
        (2, 3, 2, 32, torch.float32),
        (3, 2, 17, 32, torch.float32),
        (2, 2, 50, 64, torch.float32),
        (1, 3, 65, 48, torch.float32),
        (2, 2, 17, 64, torch.float16),
        (1, 2, 50, 48, torch.float16),
        (2, 1, 65, 32, torch.bfloat16),
        (1, 2, 33, 64, torch.bfloat16),
        (1, 1, 197, 64, torch.bfloat16),
        (2, 1, 19, 80, torch.float16),
    ],
)
def test_forward_matches_reference(B, H, L, Dh, dtype):
    check_forward(*qkv(B, H, L, Dh, dtype, seed=L * 7 + Dh))


@pytest.mark.parametrize("num_prefix_tokens", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cls_attn_is_the_patch_part_of_a_distribution(num_prefix_tokens, dtype):
    B, H, L, Dh = 3, 2, 37, 32
    q, k, v = qkv(B, H, L, Dh, dtype, seed=11 + num_prefix_tokens)
    # Point the prefix keys towards query 0 (scaled per batch) so that they carry visible mass.
    k[:, :, :num_prefix_tokens] = q[:, :, :1] * torch.tensor([0.2, 0.3, 0.4]).to(dtype).view(B, 1, 1, 1)
    _, cls_attn = check_forward(q, k, v, scale=0.5, num_prefix_tokens=num_prefix_tokens)
    assert (cls_attn >= 0).all()
    row_sums = cls_attn.sum(dim=1)
    assert (row_sums <= 1 + 1e-5).all()
    # What is missing from 1 is exactly the head-mean mass query 0 puts on the prefix keys.
    probs = torch.softmax(q.float() @ k.float().transpose(-2, -1) * 0.5, dim=-1)
    prefix_mass = probs[:, :, 0, :num_prefix_tokens].sum(-1).mean(1)
    assert (prefix_mass > 0.02).all()
    torch.testing.assert_close(row_sums, 1 - prefix_mass, rtol=1e-5, atol=1e-5)


def test_prefix_covering_the_whole_sequence_gives_an_empty_map():
    q, k, v = qkv(2, 2, 3, 32, torch.float32, seed=5)
    out, cls_attn = check_forward(q, k, v, num_prefix_tokens=3)
    assert cls_attn.shape == (2, 0)


@pytest.mark.parametrize(
    "B,H,L,Dh,dtype,num_prefix_tokens",
    [
        (2, 3, 17, 32, torch.float32, 1),
        (1, 2, 50, 48, torch.float32, 2),
        (2, 1, 2, 64, torch.float32, 1),
        (1, 2, 33, 64, torch.float16, 1),
        (2, 1, 65, 32, torch.bfloat16, 2),
        (1, 1, 197, 64, torch.bfloat16, 1),
    ],
)
def test_gradients_match_reference(B, H, L, Dh, dtype, num_prefix_tokens):
    q, k, v = qkv(B, H, L, Dh, dtype, seed=L + Dh, requires_grad=True)
    out, cls_attn = ops.attention(
        q, k, v, return_cls_attn=True, num_prefix_tokens=num_prefix_tokens, backend=TRITON
    )
    assert not cls_attn.requires_grad
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out = reference.attention(q, k, v)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g, r, **GRAD_TOL[dtype], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_timm_strided_views_forward_and_backward(dtype):
    """q/k/v as non-contiguous views of one qkv projection (read in place), and the output
    gradient arriving through timm's ``transpose(1, 2).reshape(B, L, C)``."""
    B, H, L, Dh = 2, 3, 29, 32
    x, q, k, v = timm_qkv(B, H, L, Dh, dtype, seed=21, requires_grad=True)
    assert not q.is_contiguous()
    out, _ = check_forward(q, k, v)
    # The output is laid out so that timm's merge of the heads is a view, not a copy.
    assert out.transpose(1, 2).is_contiguous()
    weight = torch.randn(B, L, H * Dh, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    (grad_x,) = torch.autograd.grad((out.transpose(1, 2).reshape(B, L, H * Dh) * weight).sum(), x)
    ref_x = x.detach().clone().requires_grad_(True)
    rq, rk, rv = ref_x.reshape(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    ref_out = reference.attention(rq, rk, rv)
    (ref_grad_x,) = torch.autograd.grad((ref_out.transpose(1, 2).reshape(B, L, H * Dh) * weight).sum(), ref_x)
    torch.testing.assert_close(grad_x, ref_grad_x, **GRAD_TOL[dtype])


def test_noncontiguous_head_dim_stride():
    """A head-dim stride other than 1 (every other element of a wider buffer)."""
    q, k, v = (noncontiguous(t) for t in qkv(2, 2, 19, 32, torch.float32, seed=8))
    q.requires_grad_(True)
    out, _ = check_forward(q, k, v, num_prefix_tokens=2)
    (dq,) = torch.autograd.grad(out.sum(), q)
    (ref_dq,) = torch.autograd.grad(reference.attention(q, k, v).sum(), q)
    torch.testing.assert_close(dq, ref_dq, **GRAD_TOL[torch.float32])


def test_gradients_when_only_some_inputs_require_them():
    q, k, v = qkv(1, 2, 21, 32, torch.float32, seed=10)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = ops.attention(q, k, v, backend=TRITON)
    dk, dv = torch.autograd.grad(out.square().sum(), (k, v))
    ref_dk, ref_dv = torch.autograd.grad(reference.attention(q, k, v).square().sum(), (k, v))
    torch.testing.assert_close(dk, ref_dk, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(dv, ref_dv, **GRAD_TOL[torch.float32])


def test_empty_batch():
    q, k, v = qkv(0, 2, 5, 32, torch.float16, seed=0)
    out, cls_attn = ops.attention(q, k, v, return_cls_attn=True, backend=TRITON)
    assert out.shape == (0, 2, 5, 32) and cls_attn.shape == (0, 4)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2])
def test_scale_argument(scale):
    q, k, v = qkv(2, 2, 23, 32, torch.float32, seed=9, requires_grad=True)
    out, _ = check_forward(q, k, v, scale=scale)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(reference.attention(q, k, v, scale).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **GRAD_TOL[torch.float32])


def test_without_cls_export_returns_only_out_and_is_deterministic():
    q, k, v = qkv(2, 3, 41, 64, torch.float16, seed=13)
    out = ops.attention(q, k, v, backend=TRITON)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, reference.attention(q, k, v), **OUT_TOL[torch.float16])
    out_cls, cls_a = ops.attention(q, k, v, return_cls_attn=True, backend=TRITON)
    _, cls_b = ops.attention(q, k, v, return_cls_attn=True, backend=TRITON)
    # No atomics: the same call is bitwise repeatable.
    assert torch.equal(cls_a, cls_b)
    # The export must not change the output.  With fixed blocks (interpreter) the two variants sum in
    # the same order; on a GPU each variant autotunes its own blocks, so only rounding may differ.
    if HAS_CUDA:
        torch.testing.assert_close(out, out_cls, **OUT_TOL[torch.float16])
    else:
        assert torch.equal(out, out_cls)


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest trailing [.., a, b] output of any aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                self.largest = max(self.largest, t.shape[-1] * t.shape[-2])
        return out


@pytest.mark.parametrize("L,Dh,dtype,num_prefix_tokens", [
    (1, 32, torch.float32, 1), (17, 48, torch.float32, 2), (197, 64, torch.float32, 1),
    (50, 64, torch.float16, 1), (65, 48, torch.bfloat16, 2), (197, 64, torch.bfloat16, 1),
])
def test_torch_backend_matches_reference_without_the_matrix(L, Dh, dtype, num_prefix_tokens):
    # The torch backend (SDPA for out, query 0's score row for the map) is the reference's result
    # without its [B, H, L, L] matrix: at most an [L, Dh] or [1, L] tile per (batch, head) exists.
    x, q, k, v = timm_qkv(2, 3, L, Dh, dtype, seed=L + Dh, requires_grad=True)
    with _LargestOutput() as seen:
        out, cls_attn = ops.attention(q, k, v, return_cls_attn=True, num_prefix_tokens=num_prefix_tokens,
                                      backend="torch")
    if L > Dh:  # else an [L, Dh] tile is as large as [L, L]
        assert seen.largest < L * L, seen.largest
    ref_out, ref_cls = reference.attention(q, k, v, None, True, num_prefix_tokens)
    assert out.dtype == dtype and cls_attn.dtype == torch.float32 and not cls_attn.requires_grad
    torch.testing.assert_close(out, ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(cls_attn, ref_cls, **CLS_TOL)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, dout)
    (ref_grad,) = torch.autograd.grad(ref_out, x, dout)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL[dtype])
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # the op runs in the inputs' dtype
        out_ac, cls_ac = ops.attention(q, k, v, return_cls_attn=True, backend="torch")
    assert out_ac.dtype == dtype and cls_ac.dtype == torch.float32


def test_bad_inputs_raise_naming_the_argument():
    q, k, v = qkv(1, 2, 5, 32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="q must have shape"):
        ops.attention(q[0], k, v, backend=TRITON)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ops.attention(q, k.numpy(), v, backend=TRITON)
    with pytest.raises(ValueError, match="one shape"):
        ops.attention(q, k[:, :, :4], v, backend=TRITON)
    with pytest.raises(ValueError, match="one shape"):
        ops.attention(q, k, v[..., :16], backend=TRITON)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.attention(q, k.half(), v, backend=TRITON)
    with pytest.raises(TypeError, match="v must be float32, float16 or bfloat16"):
        ops.attention(q, k, v.to(torch.int32), backend=TRITON)
    with pytest.raises(ValueError, match="k is on meta"):
        ops.attention(q, k.to("meta"), v, backend=TRITON)
    for bad in (0, 6, -1, True, 1.0):
        with pytest.raises(ValueError, match="num_prefix_tokens"):
            ops.attention(q, k, v, return_cls_attn=True, num_prefix_tokens=bad, backend=TRITON)
    for bad in (0, -0.5, "0.1"):
        with pytest.raises(ValueError, match="scale"):
            ops.attention(q, k, v, scale=bad, backend=TRITON)


# ---------------------------------------------------------------------------------------------
# GPU: ViT shapes (autotuned blocks) against the reference and SDPA
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("H", [6, 12])
def test_gpu_vit_shapes_match_reference_and_sdpa(H):
    B, L, Dh, dtype = 64, 197, 64, torch.bfloat16
    x, q, k, v = timm_qkv(B, H, L, Dh, dtype, seed=H, requires_grad=True)
    out, cls_attn = check_forward(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, sdpa, **OUT_TOL[dtype])
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(reference.attention(q, k, v), (q, k, v), grad_out)
    for g, s, r in zip(grads, sdpa_grads, ref_grads):
        torch.testing.assert_close(g, r, **GRAD_TOL[dtype])
        torch.testing.assert_close(g, s, **GRAD_TOL[dtype])
    assert (cls_attn >= 0).all()
    assert (cls_attn.sum(1) <= 1 + 1e-4).all()


@pytest.mark.gpu
@pytest.mark.parametrize("L", [50, 65, 98, 257])
@pytest.mark.parametrize("Dh", [32, 64, 80, 128])
def test_gpu_lengths_and_head_dims(L, Dh):
    dtype = torch.float16
    q, k, v = qkv(8, 4, L, Dh, dtype, seed=L + Dh, requires_grad=True)
    out, _ = check_forward(q, k, v, num_prefix_tokens=2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(reference.attention(q, k, v).float().square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **GRAD_TOL[dtype])


@pytest.mark.gpu
def test_gpu_float32_is_ieee_unless_tf32_allowed():
    q, k, v = qkv(4, 6, 197, 64, torch.float32, seed=2)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        check_forward(q, k, v)
        ref_out, ref_cls = reference.attention(q, k, v, None, True)
        # With TF32 allowed the kernel follows PyTorch's matmuls onto the TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        out, cls_attn = ops.attention(q, k, v, return_cls_attn=True, backend=TRITON)
        torch.testing.assert_close(out, ref_out, rtol=5e-3, atol=5e-3)
        torch.testing.assert_close(cls_attn, ref_cls, rtol=5e-3, atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
