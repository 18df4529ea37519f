"""Token gather / scatter / random masking / mask token: kernels (Triton, CUDA) == the PyTorch reference.

Forward results are compared with ``torch.equal``: the ops only move rows (and the fused pos-embed add
rounds float32 -> dtype exactly like the reference), so any difference is a bug.  Gradients are
compared with the dtype tolerances.  Under the Triton interpreter the shapes are small and the
awkward cases (N=197, K=1, K=N-1, K=N, D=390, fp16/bf16, non-contiguous x) are covered by a list of
cases rather than the full Cartesian product, to keep the file fast on a CPU.
"""
import importlib

import pytest
import torch

from fastmask import ops, reference
from fastmask._backend import _probe
from helpers import DEVICE, KERNEL_BACKENDS, TOL, noncontiguous, randn

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (N, K, D, dtype, non-contiguous x, pos_embed/fill layout): every N, K-class, D and dtype appears.
GATHER_CASES = [
    (196, 49, 64, FP32, False, None),
    (197, 1, 390, BF16, True, "1ND-fp32"),
    (197, 196, 48, FP16, False, "ND-same"),
    (50, 50, 384, BF16, False, "ND-same"),
    (50, 12, 390, FP32, True, "1ND-fp32"),
    (196, 195, 390, FP16, True, None),
    (197, 49, 384, FP32, False, "ND-same"),
    (50, 1, 48, BF16, True, None),
]


def _case_id(case):
    N, K, D, dtype, strided, extra = case
    return f"N{N}-K{K}-D{D}-{str(dtype)[6:]}-{'strided' if strided else 'contig'}-{extra or 'plain'}"


def _ids(B, N, K, generator):
    """Unique token ids per row, in random (unsorted) order: gather/scatter accept any order."""
    return torch.stack([torch.randperm(N, generator=generator)[:K] for _ in range(B)]).to(DEVICE)


def _extra(kind, N, D, dtype, generator, requires_grad=False):
    if kind is None:
        return None
    layout, which = kind.split("-")
    extra_dtype = FP32 if which == "fp32" else dtype
    shape = (1, N, D) if layout == "1ND" else (N, D)
    return randn(*shape, dtype=extra_dtype, generator=generator, requires_grad=requires_grad)


def _maybe_strided(t, strided):
    return noncontiguous(t) if strided else t


def _run_backward(op, strided, grad_out, first, *middle, last):
    """``out = op(first, *middle, last)`` and ``out.backward(grad_out)`` on fresh leaf copies of ``first``
    (passed non-contiguous if ``strided``) and ``last`` (None stays None); returns out and both grads."""
    first = first.clone().requires_grad_(True)
    last = None if last is None else last.clone().requires_grad_(True)
    out = op(_maybe_strided(first, strided), *middle, last)
    out.backward(grad_out)
    return out.detach(), first.grad, None if last is None else last.grad


def _sum_tol(dtype):
    """Tolerance for a gradient summed over many rows: both sides accumulate in float32 (in different
    orders) and round once to ``dtype``, so they may differ by about two units in the last place."""
    return dict(rtol=2 * torch.finfo(dtype).eps + 1e-5, atol=10 * TOL[dtype]["atol"])


# --------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", GATHER_CASES, ids=_case_id)
def test_gather_matches_reference(backend, case):
    N, K, D, dtype, strided, pos_kind = case
    g = torch.Generator().manual_seed(N * 1000 + K + D)
    B = 2
    x = _maybe_strided(randn(B, N, D, dtype=dtype, generator=g), strided)
    ids = _ids(B, N, K, g)
    pos = _extra(pos_kind, N, D, dtype, g)
    out = ops.gather_tokens(x, ids, pos_embed=pos, backend=backend)
    ref = reference.gather_tokens(x, ids, pos)
    assert out.dtype == x.dtype and out.shape == (B, K, D)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [GATHER_CASES[i] for i in (1, 2, 4, 5)], ids=_case_id)
def test_gather_gradients(backend, case):
    N, K, D, dtype, strided, pos_kind = case
    g = torch.Generator().manual_seed(7)
    B = 2
    x_base = randn(B, N, D, dtype=dtype, generator=g)
    ids = _ids(B, N, K, g)
    pos_base = _extra(pos_kind, N, D, dtype, g)
    grad_out = randn(B, K, D, dtype=dtype, generator=g)

    _, gx, gp = _run_backward(lambda x, i, p: ops.gather_tokens(x, i, pos_embed=p, backend=backend),
                              strided, grad_out, x_base, ids, last=pos_base)
    _, rx, rp = _run_backward(reference.gather_tokens, strided, grad_out, x_base, ids, last=pos_base)
    assert gx.dtype == rx.dtype and torch.equal(gx, rx)  # a scatter of the grad: exact
    if rp is not None:
        assert gp.shape == rp.shape and gp.dtype == rp.dtype
        torch.testing.assert_close(gp, rp, **TOL[dtype])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gather_grad_only_pos_embed_and_expanded_grad(backend):
    """x without grad, pos_embed with grad, and a broadcast (stride-0) upstream gradient from .sum()."""
    g = torch.Generator().manual_seed(3)
    x = randn(3, 50, 48, generator=g)
    ids = _ids(3, 50, 13, g)
    pos = randn(1, 50, 48, generator=g, requires_grad=True)
    ops.gather_tokens(x, ids, pos_embed=pos, backend=backend).sum().backward()
    ref_pos = pos.detach().clone().requires_grad_(True)
    reference.gather_tokens(x, ids, ref_pos).sum().backward()
    torch.testing.assert_close(pos.grad, ref_pos.grad, **TOL[FP32])


# --------------------------------------------------------------------------------------------
# scatter
# --------------------------------------------------------------------------------------------

# (N, K, D, dtype, non-contiguous x_kept, fill layout)
SCATTER_CASES = [
    (196, 49, 64, FP32, False, None),
    (197, 1, 390, BF16, True, "D-fp32"),
    (197, 196, 48, FP16, False, "D-same"),
    (50, 50, 384, BF16, False, "D-same"),
    (50, 12, 390, FP32, True, None),
    (196, 195, 390, FP16, True, "11D-same"),
]


def _fill(kind, D, dtype, generator, requires_grad=False):
    if kind is None:
        return None
    layout, which = kind.split("-")
    shape = (D,) if layout == "D" else (1, 1, D)
    return randn(*shape, dtype=FP32 if which == "fp32" else dtype, generator=generator, requires_grad=requires_grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", SCATTER_CASES, ids=_case_id)
def test_scatter_matches_reference(backend, case):
    N, K, D, dtype, strided, fill_kind = case
    g = torch.Generator().manual_seed(N + K * 7 + D)
    B = 2
    x_kept = _maybe_strided(randn(B, K, D, dtype=dtype, generator=g), strided)
    ids = _ids(B, N, K, g)
    fill = _fill(fill_kind, D, dtype, g)
    out = ops.scatter_tokens(x_kept, ids, N, fill, backend=backend)
    assert out.dtype == dtype and out.shape == (B, N, D)
    assert torch.equal(out, reference.scatter_tokens(x_kept, ids, N, fill))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [SCATTER_CASES[i] for i in (1, 2, 4, 5)], ids=_case_id)
def test_scatter_gradients(backend, case):
    N, K, D, dtype, strided, fill_kind = case
    g = torch.Generator().manual_seed(11)
    B = 2
    xk_base = randn(B, K, D, dtype=dtype, generator=g)
    ids = _ids(B, N, K, g)
    fill_base = _fill(fill_kind, D, dtype, g)
    grad_out = randn(B, N, D, dtype=dtype, generator=g)

    _, gx, gf = _run_backward(lambda xk, i, n, f: ops.scatter_tokens(xk, i, n, f, backend=backend),
                              strided, grad_out, xk_base, ids, N, last=fill_base)
    _, rx, rf = _run_backward(reference.scatter_tokens, strided, grad_out, xk_base, ids, N, last=fill_base)
    assert torch.equal(gx, rx)  # a gather of the grad: exact
    if rf is not None:
        assert gf.shape == rf.shape and gf.dtype == rf.dtype
        torch.testing.assert_close(gf.float(), rf.float(), **_sum_tol(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_scatter_inverts_gather(backend):
    g = torch.Generator().manual_seed(5)
    x = randn(2, 197, 48, dtype=BF16, generator=g)
    ids = _ids(2, 197, 60, g)
    kept = ops.gather_tokens(x, ids, backend=backend)
    back = ops.scatter_tokens(kept, ids, 197, backend=backend)
    hidden = torch.ones(2, 197, dtype=torch.bool, device=DEVICE).scatter_(1, ids, False)
    assert torch.equal(back[~hidden], x[~hidden])
    assert bool((back[hidden] == 0).all())


# --------------------------------------------------------------------------------------------
# mask token
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "N, D, dtype, strided, token_dtype",
    [
        (197, 390, BF16, True, FP32),
        (196, 64, FP16, False, FP16),
        (50, 48, FP32, True, FP32),
        (50, 384, BF16, False, BF16),
    ],
)
def test_apply_mask_token_matches_reference_with_grads(backend, N, D, dtype, strided, token_dtype):
    g = torch.Generator().manual_seed(N + D)
    B = 2
    x_base = randn(B, N, D, dtype=dtype, generator=g)
    mask = (torch.rand(B, N, generator=g) < 0.4).to(DEVICE)
    mask[0, 0], mask[1, -1] = True, False  # first and last rows take both branches
    token_base = randn(D, dtype=token_dtype, generator=g)
    grad_out = randn(B, N, D, dtype=dtype, generator=g)

    out, gx, gt = _run_backward(lambda x, m, t: ops.apply_mask_token(x, m, t, backend=backend),
                                strided, grad_out, x_base, mask, last=token_base)
    ref, rx, rt = _run_backward(reference.apply_mask_token, strided, grad_out, x_base, mask, last=token_base)
    assert torch.equal(out, ref)
    assert torch.equal(gx, rx)
    assert gt.dtype == rt.dtype and gt.shape == rt.shape
    torch.testing.assert_close(gt.float(), rt.float(), **_sum_tol(dtype))


# --------------------------------------------------------------------------------------------
# random masking
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "B, N, mask_ratio, seed",
    [
        (4, 196, 0.75, 0),
        (3, 197, 0.5, 12345),
        (5, 50, 0.0, 2**40 + 7),  # K = N, a seed above 32 bits
        (2, 196, 0.995, 1),  # K = 1
        (2, 50, 0.02, 99),  # K = N - 1
        (2, 50, 0.99, 4),  # K = 0
    ],
)
def test_random_masking_bit_identical_to_reference(backend, B, N, mask_ratio, seed):
    g = torch.Generator().manual_seed(seed % 1000)
    x = randn(B, N, 48, dtype=BF16, generator=g)
    pos = randn(1, N, 48, generator=g)
    got = ops.random_masking(x, mask_ratio, seed=seed, pos_embed=pos, backend=backend)
    ref = reference.random_masking(x, mask_ratio, seed, pos)
    K = reference.keep_count(N, mask_ratio)
    assert got.ids_keep.shape == (B, K) and got.ids_keep.dtype == torch.int64
    assert got.mask.dtype == torch.bool and got.ids_restore.dtype == torch.int64
    for name in ("ids_keep", "mask", "ids_restore", "x_kept"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_random_keep_long_rows(backend):
    """Rows longer than a ViT's (N=1024 and a non-power-of-two 1100) sort and select correctly."""
    from fastmask.philox import seed_tensor

    for N, K in ((1024, 256), (1100, 1099)):
        ids_keep, mask, ids_restore = torch.ops.fastmask.random_keep(seed_tensor(seed=2024, device=DEVICE), 1, N, K, backend)
        keys = reference.token_keys(2024, 1, N, DEVICE)
        ref_keep = torch.sort(torch.argsort(keys, dim=1)[:, :K], dim=1).values
        ref_mask, ref_restore = reference.masks_from_keep(ref_keep, N)
        assert torch.equal(ids_keep, ref_keep) and torch.equal(mask, ref_mask) and torch.equal(ids_restore, ref_restore)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_random_masking_invariants(backend):
    B, N, D, mask_ratio = 6, 197, 48, 0.6
    x = randn(B, N, D, generator=torch.Generator().manual_seed(1))
    res = ops.random_masking(x, mask_ratio, seed=77, backend=backend)
    K = reference.keep_count(N, mask_ratio)
    assert bool((res.mask.sum(1) == N - K).all()), "exactly K tokens kept per row"
    assert bool((res.ids_keep[:, 1:] > res.ids_keep[:, :-1]).all()), "ids_keep strictly ascending"
    assert not bool(res.mask.gather(1, res.ids_keep).any()), "kept tokens are not masked"
    assert torch.equal(res.x_kept, torch.gather(x, 1, res.ids_keep[..., None].expand(-1, -1, D)))
    # ids_restore puts [kept (ascending), hidden (ascending)] back in token order.
    ids_hidden = torch.stack([torch.nonzero(row).flatten() for row in res.mask])
    x_hidden = torch.gather(x, 1, ids_hidden[..., None].expand(-1, -1, D))
    restored = torch.gather(torch.cat([res.x_kept, x_hidden], 1), 1, res.ids_restore[..., None].expand(-1, -1, D))
    assert torch.equal(restored, x)
    assert torch.equal(torch.sort(res.ids_restore, 1).values, torch.arange(N, device=DEVICE).expand(B, N))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_random_masking_deterministic_under_seed(backend):
    x = randn(4, 50, 48, generator=torch.Generator().manual_seed(2))
    a = ops.random_masking(x, 0.75, seed=9, backend=backend)
    b = ops.random_masking(x, 0.75, seed=9, backend=backend)
    c = ops.random_masking(x, 0.75, seed=10, backend=backend)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a.ids_keep, c.ids_keep)
    # A generator with a fixed state draws the same seed, hence the same mask; rows differ from each other.
    d = ops.random_masking(x, 0.75, generator=torch.Generator().manual_seed(4), backend=backend)
    e = ops.random_masking(x, 0.75, generator=torch.Generator().manual_seed(4), backend=backend)
    assert torch.equal(d.ids_keep, e.ids_keep)
    assert not torch.equal(d.ids_keep[0], d.ids_keep[1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_random_masking_gradient_reaches_x_and_pos_embed(backend):
    g = torch.Generator().manual_seed(8)
    x = randn(2, 50, 48, dtype=FP16, generator=g, requires_grad=True)
    pos = randn(50, 48, generator=g, requires_grad=True)
    res = ops.random_masking(x, 0.5, seed=3, pos_embed=pos, backend=backend)
    grad = randn(*res.x_kept.shape, dtype=FP16, generator=g)
    res.x_kept.backward(grad)
    x_ref, pos_ref = x.detach().clone().requires_grad_(True), pos.detach().clone().requires_grad_(True)
    reference.random_masking(x_ref, 0.5, 3, pos_ref).x_kept.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    torch.testing.assert_close(pos.grad, pos_ref.grad, **TOL[FP16])


# --------------------------------------------------------------------------------------------
# bad input (through fastmask.ops: checked before any backend runs)
# --------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 10, 8)
    ids = torch.tensor([[0, 3, 5], [1, 2, 9]])
    with pytest.raises(ValueError, match="x must have shape"):
        ops.gather_tokens(x[0], ids)
    with pytest.raises(ValueError, match="ids must have shape"):
        ops.gather_tokens(x, ids[0])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        ops.gather_tokens(x, torch.tensor([[0, 3, 10], [1, 2, 9]]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        ops.gather_tokens(x, torch.tensor([[0, -1, 5], [1, 2, 9]]))
    with pytest.raises(ValueError, match="ids must not repeat"):
        ops.gather_tokens(x, torch.tensor([[0, 3, 3], [1, 2, 9]]))
    with pytest.raises(TypeError, match="ids must be int64"):
        ops.gather_tokens(x, ids.int())
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.gather_tokens(x.double(), ids)
    with pytest.raises(ValueError, match="ids has batch 1"):
        ops.gather_tokens(x, ids[:1])
    with pytest.raises(ValueError, match="ids is on meta"):
        ops.gather_tokens(x, ids.to("meta"))
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        ops.gather_tokens(x, ids, pos_embed=torch.randn(9, 8))
    with pytest.raises(ValueError, match="num_tokens must be an int"):
        ops.scatter_tokens(x[:, :3], ids, 2)
    with pytest.raises(ValueError, match="fill must be a tensor of D=8"):
        ops.scatter_tokens(x[:, :3], ids, 10, fill=torch.randn(7))
    with pytest.raises(ValueError, match="fill is on meta"):
        ops.scatter_tokens(x[:, :3], ids, 10, fill=torch.randn(8, device="meta"))
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        ops.apply_mask_token(x, torch.zeros(2, 10, dtype=torch.int64), torch.randn(8))
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.apply_mask_token(x, torch.zeros(2, 9, dtype=torch.bool), torch.randn(8))
    with pytest.raises(ValueError, match="mask_token must be a tensor of D=8"):
        ops.apply_mask_token(x, torch.zeros(2, 10, dtype=torch.bool), torch.randn(3))
    for bad_ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio must lie in"):
            ops.random_masking(x, bad_ratio, seed=0)
    with pytest.raises(TypeError, match="mask_ratio must be a float"):
        ops.random_masking(x, "0.5", seed=0)


# --------------------------------------------------------------------------------------------
# backend dispatch
# --------------------------------------------------------------------------------------------

def test_backends_report_lists_token_ops():
    report = ops.backends()
    for name in ("cuda", "triton", "torch"):
        assert isinstance(report[name]["available"], bool) and report[name]["reason"]
        for op in ("gather_tokens", "scatter_tokens", "random_masking", "apply_mask_token"):
            assert op in report[name]["ops"]
    assert report["torch"]["available"]


def test_env_forcing_picks_the_kernel_backend(monkeypatch):
    from fastmask import library

    calls = []
    real = library.gather_tokens

    def spy(*args):
        if args[-1] != "torch":
            calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(library, "gather_tokens", spy)
    x, ids = randn(1, 10, 16), torch.tensor([[1, 4]], device=DEVICE)
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    assert torch.equal(ops.gather_tokens(x, ids), reference.gather_tokens(x, ids))
    assert calls == ["triton"]
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    ops.gather_tokens(x, ids)
    assert calls == ["triton"], "torch forced: the kernel must not run"
    # An explicit backend= wins over the environment.
    ops.gather_tokens(x, ids, backend="triton")
    assert calls == ["triton", "triton"]


@pytest.mark.skipif(_probe("cuda")[0], reason="the CUDA extension is usable here, so forcing it cannot fail")
def test_forcing_unavailable_cuda_raises_with_reason(monkeypatch):
    x, ids = torch.randn(1, 10, 16), torch.tensor([[1, 4]])
    monkeypatch.setenv("FASTMASK_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FASTMASK_BACKEND='cuda' was forced but cannot run here: .+"):
        ops.gather_tokens(x, ids)
    with pytest.raises(RuntimeError, match="backend='cuda' was forced"):
        ops.random_masking(x, 0.5, seed=0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.scatter_tokens(x[:, :2], ids, 10, backend="cpp")


def test_cuda_extension_registers_the_ops():
    """The extension adds CUDA kernels to the schemas fastmask.library defines (fastmask::cuda_<op>),
    and the public operators keep their one schema with the backend as the last argument."""
    try:
        importlib.import_module("fastmask._C")
    except ImportError as exc:
        pytest.skip(f"the CUDA extension fastmask._C is not built "
                    f"(FASTMASK_BUILD_CUDA=1 pip install --no-build-isolation -e .): {exc}")
    cuda_ops = ("gather_tokens", "scatter_tokens", "apply_mask_token", "random_keep", "gather_tokens_backward",
                "scatter_tokens_backward", "apply_mask_token_backward", "topk_tokens", "cls_attention_mask")
    for name in cuda_ops:
        qualified = f"fastmask::cuda_{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), f"{qualified} has no CUDA kernel"
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
    schemas = {
        "gather_tokens": "fastmask::gather_tokens(Tensor x, Tensor ids, Tensor? pos_embed, str backend) -> Tensor",
        "cuda_gather_tokens": "fastmask::cuda_gather_tokens(Tensor x, Tensor ids, Tensor? pos_embed) -> Tensor",
    }
    for name, schema in schemas.items():
        assert str(getattr(torch.ops.fastmask, name).default._schema) == schema


# --------------------------------------------------------------------------------------------
# GPU: every kernel backend at the real ViT-B shape
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("K", [49, 98])
def test_gpu_vit_b_shape_matches_reference(backend, K):
    B, N, D, dtype = 256, 196, 768, BF16
    g = torch.Generator().manual_seed(K)
    x = randn(B, N, D, dtype=dtype, generator=g, requires_grad=True)
    pos = randn(1, N, D, generator=g, requires_grad=True)
    mask_ratio = 1 - K / N
    res = ops.random_masking(x, mask_ratio, seed=K, pos_embed=pos, backend=backend)
    ref = reference.random_masking(x, mask_ratio, K, pos)
    for name in ("ids_keep", "mask", "ids_restore", "x_kept"):
        assert torch.equal(getattr(res, name), getattr(ref, name)), name
    grad = randn(B, K, D, dtype=dtype, generator=g)
    got_grads = torch.autograd.grad(res.x_kept, (x, pos), grad)
    ref_grads = torch.autograd.grad(ref.x_kept, (x, pos), grad)
    assert torch.equal(got_grads[0], ref_grads[0])
    torch.testing.assert_close(got_grads[1], ref_grads[1], **TOL[dtype])

    fill = randn(D, dtype=dtype, generator=g)
    x_kept = res.x_kept.detach()
    assert torch.equal(ops.scatter_tokens(x_kept, res.ids_keep, N, fill, backend=backend),
                       reference.scatter_tokens(x_kept, res.ids_keep, N, fill))
    assert torch.equal(ops.apply_mask_token(x.detach(), res.mask, fill, backend=backend),
                       reference.apply_mask_token(x.detach(), res.mask, fill))
    # Non-contiguous x (a channel slice of a wider tensor) takes the strided path.
    wide = randn(B, N, 2 * D, dtype=dtype, generator=g)
    assert torch.equal(ops.gather_tokens(wide[..., ::2], res.ids_keep, backend=backend),
                       reference.gather_tokens(wide[..., ::2], res.ids_keep))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("D, dtype", [(390, FP32), (390, BF16), (384, FP16), (770, BF16)])
def test_gpu_awkward_widths_and_alignment(backend, D, dtype):
    """Widths that allow only 8-, 4-byte or scalar accesses, and a misaligned base pointer."""
    g = torch.Generator().manual_seed(D)
    B, N, K = 8, 197, 50
    buf = randn(B * N * D + 1, dtype=dtype, generator=g)
    x = buf[1:].view(B, N, D)  # data pointer off by one element: no 16-byte vectors
    ids = _ids(B, N, K, g)
    pos = randn(N, D, dtype=FP32, generator=g)
    assert torch.equal(ops.gather_tokens(x, ids, pos_embed=pos, backend=backend), reference.gather_tokens(x, ids, pos))
    kept = reference.gather_tokens(x, ids)
    assert torch.equal(ops.scatter_tokens(kept, ids, N, backend=backend), reference.scatter_tokens(kept, ids, N))
    fill = randn(D + 1, dtype=dtype, generator=g)[1:]  # a misaligned fill/mask token
    assert torch.equal(ops.scatter_tokens(kept, ids, N, fill, backend=backend),
                       reference.scatter_tokens(kept, ids, N, fill))
    mask = (torch.rand(B, N, generator=g) < 0.5).to(DEVICE)
    assert torch.equal(ops.apply_mask_token(x, mask, fill, backend=backend), reference.apply_mask_token(x, mask, fill))
