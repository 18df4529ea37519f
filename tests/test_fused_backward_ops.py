"""The fused backward operators (fastmask::{gather_tokens,scatter_tokens,apply_mask_token}_backward) and
fastmask::cls_row: every backend equals the torch one, schemas/fakes/autograd pass opcheck, the
extension's cuda_* schemas exist without it.  (The public ops' gradients against the reference are in
test_token_gather.py; the bytes these save in tests/test_token_bytes.py.)"""
import pytest
import torch

import fastmask.library  # noqa: F401  (registers the operators)
from helpers import KERNEL_BACKENDS

OPS = torch.ops.fastmask


def _grads(B=3, N=13, K=5, D=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)])
    mask = torch.rand(B, N, generator=g) < 0.4
    return dict(ids=ids, mask=mask, gk=torch.randn(B, K, D, generator=g).to(dtype),
                gn=torch.randn(B, N, D, generator=g).to(dtype), N=N)


def _cases(t, backend, need_x=True, dtype=torch.float32):
    return {
        "gather": (OPS.gather_tokens_backward, (t["gk"], t["ids"], t["N"], need_x, dtype, backend)),
        "scatter": (OPS.scatter_tokens_backward, (t["gn"], t["ids"], need_x, dtype, backend)),
        "mask_token": (OPS.apply_mask_token_backward, (t["gn"], t["mask"], need_x, dtype, backend)),
    }


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_x", [True, False])
def test_kernels_equal_the_torch_recipe(backend, dtype, need_x):
    t = _grads(dtype=dtype)
    want = _cases(t, "torch", need_x, torch.float32)
    for name, (op, args) in _cases(t, backend, need_x, torch.float32).items():
        got_x, got_red = op(*args)
        ref_x, ref_red = want[name][0](*want[name][1])
        if need_x:
            assert torch.equal(got_x, ref_x), name  # row copies: exact
        else:
            assert got_x.numel() == 0 and ref_x.numel() == 0
        torch.testing.assert_close(got_red, ref_red, rtol=1e-5, atol=1e-5)


def test_reduction_in_the_parameter_dtype_and_non_contiguous_grad():
    t = _grads(B=2, N=197, K=49, D=40)
    wide = torch.randn(2, 197, 80)
    t["gn"] = wide[..., ::2]  # non-contiguous rows
    for name, (op, args) in _cases(t, "triton", True, torch.bfloat16).items():
        got_x, got_red = op(*args)
        ref_x, ref_red = _cases(t, "torch", True, torch.bfloat16)[name][0](*_cases(t, "torch", True, torch.bfloat16)[name][1])
        assert got_red.dtype == torch.bfloat16 and torch.equal(got_x, ref_x), name
        torch.testing.assert_close(got_red, ref_red, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_opcheck(backend):
    t = _grads(B=2, N=7, K=3, D=8)
    for name, (op, args) in _cases(t, backend).items():
        torch.library.opcheck(op, args)
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    torch.library.opcheck(OPS.cls_row, (q, k, 0.35, 1, backend))


def test_cuda_schemas_and_fakes_exist_without_the_extension():
    t = _grads()
    with torch._subclasses.FakeTensorMode():
        gk = torch.empty(3, 5, 24, device="meta")
        ids = torch.empty(3, 5, dtype=torch.long, device="meta")
        gx, gp = OPS.cuda_gather_tokens_backward(gk, ids, 13, True, torch.bfloat16)
        assert gx.shape == (3, 13, 24) and gp.shape == (13, 24) and gp.dtype == torch.bfloat16
        gn = torch.empty(3, 13, 24, device="meta")
        gx, gf = OPS.cuda_scatter_tokens_backward(gn, ids, False, torch.float32)
        assert gx.numel() == 0 and gf.shape == (24,)
        gx, gt = OPS.cuda_apply_mask_token_backward(gn, torch.empty(3, 13, dtype=torch.bool, device="meta"), True,
                                                    torch.float16)
        assert gx.shape == gn.shape and gt.dtype == torch.float16
    assert t["N"] == 13


def test_cls_row_operator_matches_the_kernel_and_compiles():
    from fastmask import reference

    q, k, v = (torch.randn(2, 6, 50, 32) for _ in range(3))
    _, ref = reference.attention(q, k, v, None, True, 1)
    for backend in ("torch", "triton"):
        torch.testing.assert_close(OPS.cls_row(q, k, 32 ** -0.5, 1, backend), ref, rtol=2e-5, atol=1e-7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k: OPS.cls_row(q, k, 32 ** -0.5, 1, "torch"), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k), ref, rtol=2e-5, atol=1e-7)
    torch._dynamo.reset()
