"""fastmask.ops.sdist_loss / sdist_loss_linear against their reference (fastmask/sdist.py).

Triton runs in the interpreter on the CPU (conftest), so the shapes are small but awkward: K not a
power of two (and below one kernel block), one crop, 12 crops, bf16/fp16/fp32, a non-contiguous
student, slices of the fused-linear path that do not divide K.
"""
from __future__ import annotations

import pytest
import torch

from fastmask import ops
from fastmask.sdist import sdist_loss_reference

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
       torch.float16: dict(rtol=2e-3, atol=1e-4)}

# (B, student views V, teacher views G, K, dtype): DINO's cross-view CLS form and iBOT's masked patch form
CASES = [
    (3, 4, 2, 300, torch.float32),     # K > one interpreter block and not a power of two
    (7, 1, 1, 77, torch.bfloat16),     # one crop: the masked patch form (one row per masked token)
    (2, 12, 2, 1000, torch.float32),   # 12 crops
    (4, 3, 2, 129, torch.float16),
    (1, 2, 1, 1, torch.float32),       # a single prototype
]


def make(b, v, g, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(v * b, k, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(g * b, k, generator=gen) * 3).to(dtype)
    center = torch.randn(1, k, generator=gen) * 0.5
    pair = torch.rand(g, v, generator=gen)
    rows = torch.rand(b, generator=gen)
    return student, teacher, center, pair, rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,v,g,k,dtype", CASES)
def test_sdist_loss_matches_reference(backend, b, v, g, k, dtype):
    student, teacher, center, pair, rows = make(b, v, g, k, dtype)
    student.requires_grad_()
    ref = sdist_loss_reference(student, teacher, center, 0.1, 0.04, pair, rows)
    (ref_grad,) = torch.autograd.grad(ref, student)
    loss = ops.sdist_loss(student, teacher, center, 0.1, 0.04, pair_weight=pair, row_weight=rows, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(loss * 1.7, student)  # a non-unit incoming gradient
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), 1.7 * ref_grad.float(), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdist_loss_non_contiguous_student(backend):
    b, v, g, k = 3, 4, 2, 150
    wide, teacher, center, pair, rows = make(b, v, g, 2 * k, torch.float32)
    student = wide[:, ::2].detach().requires_grad_()  # column stride 2
    teacher = teacher[:, :k]
    center = center[:, :k]
    ref = sdist_loss_reference(student, teacher, center, 0.1, 0.07, pair, rows)
    loss = ops.sdist_loss(student, teacher, center, 0.1, 0.07, pair_weight=pair, row_weight=rows, backend=backend)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref, student)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,v,g,k,dtype,width", [(3, 4, 2, 300, torch.float32, 128),
                                                 (5, 1, 1, 77, torch.bfloat16, 30),
                                                 (2, 12, 2, 200, torch.float32, 4096)])
def test_sdist_loss_linear_matches_reference(backend, b, v, g, k, dtype, width):
    _, teacher, center, pair, rows = make(b, v, g, k, dtype)
    gen = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(v * b, 24, generator=gen), dim=-1).to(dtype).requires_grad_()
    weight = torch.randn(k, 24, generator=gen).requires_grad_()
    ref = sdist_loss_reference(torch.nn.functional.linear(z, weight.to(dtype)), teacher, center, 0.1, 0.04, pair, rows)
    ref_gz, ref_gw = torch.autograd.grad(ref, [z, weight])
    loss = ops.sdist_loss_linear(z, weight, teacher, center, 0.1, 0.04, pair_weight=pair, row_weight=rows,
                                 slice_width=width, backend=backend)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    gz, gw = torch.autograd.grad(loss, [z, weight])
    assert gz.dtype == dtype and gw.dtype == torch.float32
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gz.float(), ref_gz.float(), **tol)
    torch.testing.assert_close(gw, ref_gw, **tol)


def _saved(fn):
    """(loss, saved tensors) of ``fn()`` under saved_tensors_hooks."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    return loss, saved


def test_sdist_loss_saves_no_rows_by_k_float32():
    """bf16 logits: backward keeps the inputs themselves (by reference) and [rows] vectors only; the
    fused-linear form keeps z, the weight and the teacher: no student logits at all."""
    b, v, g, k = 4, 6, 2, 500
    student, teacher, center, pair, rows = make(b, v, g, k, torch.bfloat16)
    student.requires_grad_()
    _, saved = _saved(lambda: ops.sdist_loss(student, teacher, center, 0.1, 0.04, pair_weight=pair,
                                             row_weight=rows, backend="torch"))
    big = [t for t in saved if t.numel() >= b * k]
    assert {t.data_ptr() for t in big} == {student.data_ptr(), teacher.data_ptr()}
    assert all(t.dtype == torch.bfloat16 for t in big)
    # Today's formula saves float32 [rows, K] tensors (log-softmax, teacher probabilities).
    _, saved_ref = _saved(lambda: sdist_loss_reference(student, teacher, center, 0.1, 0.04, pair, rows))
    assert any(t.dtype == torch.float32 and t.numel() >= v * b * k for t in saved_ref)

    z = torch.randn(v * b, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(k, 16, requires_grad=True)
    _, saved = _saved(lambda: ops.sdist_loss_linear(z, weight, teacher, center, 0.1, 0.04, pair_weight=pair,
                                                    row_weight=rows, backend="torch"))
    assert max(t.numel() for t in saved) == max(teacher.numel(), weight.numel())
    assert not any(t.shape == (v * b, k) for t in saved)


def test_sdist_loss_teacher_gets_no_gradient_and_zero_weights():
    student, teacher, center, pair, rows = make(2, 3, 1, 40, torch.float32)
    student.requires_grad_()
    teacher.requires_grad_()
    loss = ops.sdist_loss(student, teacher, center, 0.1, 0.04, pair_weight=torch.zeros_like(pair),
                          row_weight=rows, backend="torch")
    assert loss.item() == 0.0
    loss.backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) == 0


def test_sdist_loss_opcheck():
    student, teacher, center, pair, rows = make(2, 3, 2, 33, torch.float32)
    student.requires_grad_()
    args = (student, teacher, center.reshape(-1), pair, rows, 0.1, 0.04, "torch")
    torch.library.opcheck(torch.ops.fastmask.sdist_loss.default, args)
    z, w = torch.randn(6, 8, requires_grad=True), torch.randn(33, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastmask.sdist_loss_linear.default,
                          (z, w, teacher, center.reshape(-1), pair, rows, 0.1, 0.04, 16, "torch"))


def test_sdist_loss_compiles_fullgraph():
    student, teacher, center, pair, rows = make(2, 3, 2, 33, torch.float32)
    student.requires_grad_()

    def step(s):
        return ops.sdist_loss(s, teacher, center, 0.1, 0.04, pair_weight=pair, row_weight=rows, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(student)
    torch.testing.assert_close(loss, step(student))
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(step(student), student)[0])


def test_sdist_loss_bad_input():
    student, teacher, center, pair, rows = make(2, 3, 2, 10, torch.float32)
    kw = dict(pair_weight=pair, row_weight=rows, backend="torch")
    with pytest.raises(ValueError, match="teacher has 9 prototypes"):
        ops.sdist_loss(student, teacher[:, :9], center, 0.1, 0.04, **kw)
    with pytest.raises(ValueError, match="pair_weight must be"):
        ops.sdist_loss(student, teacher, center, 0.1, 0.04, pair_weight=pair.t(), row_weight=rows)
    with pytest.raises(ValueError, match="must be views x B"):
        ops.sdist_loss(student, teacher, center, 0.1, 0.04, pair_weight=pair, row_weight=rows[:1].repeat(4))
    with pytest.raises(ValueError, match="center must hold"):
        ops.sdist_loss(student, teacher, center[:, :5], 0.1, 0.04, **kw)
    with pytest.raises(ValueError, match="student_temp must be > 0"):
        ops.sdist_loss(student, teacher, center, 0.0, 0.04, **kw)
    with pytest.raises(TypeError, match="student must be float32"):
        ops.sdist_loss(student.long(), teacher, center, 0.1, 0.04, **kw)
    with pytest.raises(ValueError, match="student must be a 2-D"):
        ops.sdist_loss(student[None], teacher, center, 0.1, 0.04, **kw)
    with pytest.raises(ValueError, match="slice_width"):
        ops.sdist_loss_linear(torch.randn(6, 4), torch.randn(10, 4), teacher, center, 0.1, 0.04, slice_width=0, **kw)
