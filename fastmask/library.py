"""fastmask's operators, registered with ``torch.library``: one schema per op for every backend.

Each public op of ``fastmask.ops`` is one ``fastmask::<op>`` operator whose last argument names the
backend (``"torch"`` the reference in ``fastmask.reference``, ``"triton"`` the kernels in
``fastmask.kernels``, ``"cuda"`` the extension ``fastmask._C``); the three implementations take the
same arguments.  Every operator has a fake (shape-only) implementation, so FakeTensor, the ``meta``
device, ``torch.compile`` and ``torch.export`` trace through it, and differentiable ones have their
backward registered (``register_autograd``), written with these same operators.

The extension's kernels are the operators ``fastmask::cuda_<op>``: same arguments without the backend.
Their schemas and fakes are defined here, in Python, so that tracing works whether or not the
extension was built; ``csrc/`` only registers their CUDA kernels (``TORCH_LIBRARY_IMPL``).

The Triton path is a ``torch.library.triton_op``: under ``torch.compile`` the operator decomposes into
its ``wrap_triton`` kernel launches, which Inductor sees and schedules.  Under the CPU interpreter
(``TRITON_INTERPRET=1``) kernels cannot be traced, so there the operator stays opaque.

Randomness: ``seed`` is a one-element int64 tensor on the op's device that the kernels read (see
``fastmask.philox``).  Inputs are assumed valid (``fastmask.ops`` checks them).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from . import reference

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NAMESPACE = "fastmask"
_lib = torch.library.Library(_NAMESPACE, "FRAGMENT")  # the extension's schemas (kept alive here)


def _kernels(module: str):
    # Runs inside operator implementations only (never in code torch.compile traces), so the import
    # of triton waits for the first Triton launch.
    return importlib.import_module(f"fastmask.kernels.{module}")


def _cuda():
    importlib.import_module("fastmask._C")  # registers the CUDA kernels of torch.ops.fastmask.cuda_*
    return torch.ops.fastmask


def _define(name: str, schema: str, impl, fake):
    """``fastmask::<name>`` with ``impl`` (dispatching on its last argument, the backend) and ``fake``."""
    op = torch.library.triton_op(f"{_NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    # triton_op would trace ``impl`` as the fake; an explicit one also covers the interpreter and CUDA.
    op.register_fake(fake)

    def functional(mode, func, types, args, kwargs):
        # Decompose into the wrap_triton launches only where they can be traced: the Triton backend
        # compiled for a GPU.  Everything else stays one opaque call (its fake gives the shapes).
        backend = kwargs.get("backend", args[-1] if args else None)
        if backend != "triton" or _INTERPRET:
            return mode.__torch_dispatch__(func, types, args, kwargs)
        allowed = (torch.Tensor, torch._subclasses.FakeTensor, torch._subclasses.functional_tensor.FunctionalTensor)
        if any(not issubclass(t, allowed) for t in types):
            return NotImplemented
        with mode:
            return impl(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functional)
    return op


def _define_cuda(name: str, schema: str, fake) -> None:
    """Schema and fake of the extension's ``fastmask::cuda_<name>`` (its CUDA kernel comes from csrc/)."""
    _lib.define(f"cuda_{name}{schema}")
    torch.library.register_fake(f"{_NAMESPACE}::cuda_{name}", fake, lib=_lib)


def _no_backend(op: str, backend: str):
    return ValueError(f"{op}: unknown backend {backend!r}; expected 'torch', 'triton' or 'cuda'")


def _triton(module: str, launcher: str):
    """The launcher ``fastmask.kernels.<module>.<launcher>``, imported at its first call."""
    return lambda *args: getattr(_kernels(module), launcher)(*args)


def _define_backends(name: str, args: str, returns: str, fake, torch_impl, triton_impl):
    """``fastmask::<name>(<args>, str backend) -> <returns>`` and the extension's
    ``fastmask::cuda_<name>(<args>) -> <returns>``, one fake for both: the backend argument picks
    ``torch_impl`` (the reference), ``triton_impl`` or the extension's kernel, called with the rest."""
    _define_cuda(name, f"({args}) -> {returns}", fake)

    def impl(*inputs):
        *inputs, backend = inputs
        if backend == "torch":
            return torch_impl(*inputs)
        if backend == "triton":
            return triton_impl(*inputs)
        if backend == "cuda":
            return getattr(_cuda(), f"cuda_{name}")(*inputs)
        raise _no_backend(name, backend)

    return _define(name, f"({args}, str backend) -> {returns}", impl, lambda *inputs: fake(*inputs[:-1]))


def _x_grad_or_empty(grads, need_x: bool, like: torch.Tensor):
    """A fused backward launcher's (grad_x or None, other grad), grad_x an empty tensor when not asked
    for (a schema cannot return None)."""
    grad_x, grad_other = grads
    return (grad_x if need_x else like.new_empty(0)), grad_other


# --------------------------------------------------------------------------------------------
# gather_tokens
# --------------------------------------------------------------------------------------------

def _gather_fake(x, ids, pos_embed):
    return x.new_empty(x.shape[0], ids.shape[1], x.shape[2])


gather_tokens = _define_backends("gather_tokens", "Tensor x, Tensor ids, Tensor? pos_embed", "Tensor", _gather_fake,
                                 reference.gather_tokens, _triton("token_gather", "gather_tokens"))


def _gather_setup(ctx, inputs, output):
    x, ids, pos_embed, backend = inputs
    ctx.save_for_backward(ids)
    ctx.num_tokens, ctx.backend = x.shape[1], backend
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _gather_backward_fake(grad_out, ids, num_tokens, need_x, pos_dtype):
    B, _, D = grad_out.shape
    grad_x = grad_out.new_empty(B, num_tokens, D) if need_x else grad_out.new_empty(0)
    return grad_x, grad_out.new_empty(num_tokens, D, dtype=pos_dtype)


def _gather_backward_triton(grad_out, ids, num_tokens: int, need_x: bool, pos_dtype):
    """(grad_x or an empty tensor, grad_pos [N, D]) in one pass: the kernels sum the batch for pos_embed
    while they write grad_x (the torch recipe scatters, then re-reads grad_x for the sum)."""
    grads = _kernels("token_gather").gather_tokens_backward(grad_out, ids, num_tokens, need_x, pos_dtype)
    return _x_grad_or_empty(grads, need_x, grad_out)


def _gather_backward_torch(grad_out, ids, num_tokens: int, need_x: bool, pos_dtype):
    grad_x = reference.scatter_tokens(grad_out, ids, num_tokens, None)
    return _x_grad_or_empty((grad_x, grad_x.sum(0, dtype=torch.float32).to(pos_dtype)), need_x, grad_out)


gather_tokens_backward = _define_backends(
    "gather_tokens_backward", "Tensor grad_out, Tensor ids, SymInt num_tokens, bool need_x, ScalarType pos_dtype",
    "(Tensor, Tensor)", _gather_backward_fake, _gather_backward_torch, _gather_backward_triton,
)


def _gather_backward(ctx, grad_out):
    (ids,) = ctx.saved_tensors
    need_x, _, need_pos, _ = ctx.needs_input_grad
    grad_x = grad_pos = None
    if need_pos and ctx.backend != "torch":
        shape, dtype = ctx.pos_meta
        grad_x, grad_pos = gather_tokens_backward(grad_out, ids, ctx.num_tokens, need_x, dtype, ctx.backend)
        return (grad_x if need_x else None), None, grad_pos.reshape(shape), None
    if need_x or need_pos:
        # ids are unique per row: the scatter is a plain write, no atomics, deterministic.
        grad_x = scatter_tokens(grad_out, ids, ctx.num_tokens, None, ctx.backend)
    if need_pos:
        shape, dtype = ctx.pos_meta
        grad_pos = grad_x.sum(0, dtype=torch.float32).to(dtype).reshape(shape)
    return (grad_x if need_x else None), None, grad_pos, None


gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)


# --------------------------------------------------------------------------------------------
# scatter_tokens
# --------------------------------------------------------------------------------------------

def _scatter_fake(x_kept, ids, num_tokens, fill):
    return x_kept.new_empty(x_kept.shape[0], num_tokens, x_kept.shape[2])


scatter_tokens = _define_backends(
    "scatter_tokens", "Tensor x_kept, Tensor ids, SymInt num_tokens, Tensor? fill", "Tensor", _scatter_fake,
    reference.scatter_tokens, _triton("token_gather", "scatter_tokens"),
)


def _scatter_setup(ctx, inputs, output):
    x_kept, ids, num_tokens, fill, backend = inputs
    ctx.save_for_backward(ids)
    ctx.backend = backend
    ctx.fill_meta = None if fill is None else (fill.shape, fill.dtype)


def _scatter_backward_fake(grad_out, ids, need_x, fill_dtype):
    B, _, D = grad_out.shape
    grad_x = grad_out.new_empty(B, ids.shape[1], D) if need_x else grad_out.new_empty(0)
    return grad_x, grad_out.new_empty(D, dtype=fill_dtype)


def _scatter_backward_triton(grad_out, ids, need_x: bool, fill_dtype):
    """(grad_x_kept or an empty tensor, grad_fill [D]) in one pass over grad_out: kept rows gathered,
    hidden rows summed for the fill (the torch recipe sums all rows, then the kept ones again)."""
    grads = _kernels("token_gather").scatter_tokens_backward(grad_out, ids, need_x, fill_dtype)
    return _x_grad_or_empty(grads, need_x, grad_out)


def _scatter_backward_torch(grad_out, ids, need_x: bool, fill_dtype):
    grad_x = reference.gather_tokens(grad_out, ids, None)
    total = grad_out.sum((0, 1), dtype=torch.float32)
    grad_fill = (total - grad_x.sum((0, 1), dtype=torch.float32)).to(fill_dtype)
    return _x_grad_or_empty((grad_x, grad_fill), need_x, grad_out)


scatter_tokens_backward = _define_backends(
    "scatter_tokens_backward", "Tensor grad_out, Tensor ids, bool need_x, ScalarType fill_dtype", "(Tensor, Tensor)",
    _scatter_backward_fake, _scatter_backward_torch, _scatter_backward_triton,
)


def _scatter_backward(ctx, grad_out):
    (ids,) = ctx.saved_tensors
    need_x, _, _, need_fill, _ = ctx.needs_input_grad
    grad_x = grad_fill = None
    if need_fill and ctx.backend != "torch":
        shape, dtype = ctx.fill_meta
        grad_x, grad_fill = scatter_tokens_backward(grad_out, ids, need_x, dtype, ctx.backend)
        return (grad_x if need_x else None), None, None, grad_fill.reshape(shape), None
    if need_x or need_fill:
        grad_x = gather_tokens(grad_out, ids, None, ctx.backend)
    if need_fill:
        # The fill reaches every row not in ids: the total minus the kept rows (float32 sums).
        shape, dtype = ctx.fill_meta
        total = grad_out.sum((0, 1), dtype=torch.float32)
        grad_fill = (total - grad_x.sum((0, 1), dtype=torch.float32)).to(dtype).reshape(shape)
    return (grad_x if need_x else None), None, None, grad_fill, None


scatter_tokens.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# --------------------------------------------------------------------------------------------
# apply_mask_token
# --------------------------------------------------------------------------------------------

def _mask_token_fake(x, mask, mask_token):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


apply_mask_token = _define_backends(
    "apply_mask_token", "Tensor x, Tensor mask, Tensor mask_token", "Tensor", _mask_token_fake,
    lambda x, mask, mask_token: reference.apply_mask_token(x, mask, mask_token).contiguous(),
    _triton("token_gather", "apply_mask_token"),
)


def _mask_token_setup(ctx, inputs, output):
    x, mask, mask_token, backend = inputs
    ctx.save_for_backward(mask)
    ctx.backend = backend
    ctx.token_meta = (mask_token.shape, mask_token.dtype)


def _mask_token_backward_fake(grad_out, mask, need_x, token_dtype):
    grad_x = torch.empty_like(grad_out, memory_format=torch.contiguous_format) if need_x else grad_out.new_empty(0)
    return grad_x, grad_out.new_empty(grad_out.shape[-1], dtype=token_dtype)


def _mask_token_backward_triton(grad_out, mask, need_x: bool, token_dtype):
    """(grad_x or an empty tensor, grad_token [D]) in one pass: grad_x written and the hidden rows
    summed on the way (the torch recipe's where + sum builds a full temporary)."""
    grads = _kernels("token_gather").apply_mask_token_backward(grad_out, mask, need_x, token_dtype)
    return _x_grad_or_empty(grads, need_x, grad_out)


def _mask_token_backward_torch(grad_out, mask, need_x: bool, token_dtype):
    hidden = mask.unsqueeze(-1)
    grad_token = torch.where(hidden, grad_out, 0).sum((0, 1), dtype=torch.float32).to(token_dtype)
    grad_x = torch.where(hidden, 0, grad_out).contiguous() if need_x else grad_out.new_empty(0)
    return grad_x, grad_token


apply_mask_token_backward = _define_backends(
    "apply_mask_token_backward", "Tensor grad_out, Tensor mask, bool need_x, ScalarType token_dtype",
    "(Tensor, Tensor)", _mask_token_backward_fake, _mask_token_backward_torch, _mask_token_backward_triton,
)


def _mask_token_backward(ctx, grad_out):
    (mask,) = ctx.saved_tensors
    need_x, _, need_token, _ = ctx.needs_input_grad
    grad_x = grad_token = None
    shape, dtype = ctx.token_meta
    if need_token and ctx.backend != "torch":
        grad_x, grad_token = apply_mask_token_backward(grad_out, mask, need_x, dtype, ctx.backend)
        return (grad_x if need_x else None), None, grad_token.reshape(shape), None
    if need_x:  # where(mask, 0, grad): the same op with a zero token
        grad_x = apply_mask_token(grad_out, mask, grad_out.new_zeros(grad_out.shape[-1]), ctx.backend)
    if need_token:
        hidden = mask.unsqueeze(-1)
        grad_token = torch.where(hidden, grad_out, 0).sum((0, 1), dtype=torch.float32)
        grad_token = grad_token.to(dtype).reshape(shape)
    return grad_x, None, grad_token, None


apply_mask_token.register_autograd(_mask_token_backward, setup_context=_mask_token_setup)


# --------------------------------------------------------------------------------------------
# random_keep (and so random_masking = random_keep + gather_tokens)
# --------------------------------------------------------------------------------------------

def _random_keep_fake(seed, batch, num_tokens, keep):
    device = seed.device
    return (torch.empty(batch, keep, dtype=torch.int64, device=device),
            torch.empty(batch, num_tokens, dtype=torch.bool, device=device),
            torch.empty(batch, num_tokens, dtype=torch.int64, device=device))


random_keep = _define_backends(
    "random_keep", "Tensor seed, SymInt batch, SymInt num_tokens, SymInt keep", "(Tensor, Tensor, Tensor)",
    _random_keep_fake, reference.random_keep, _triton("token_gather", "random_keep"),
)


# --------------------------------------------------------------------------------------------
# topk_tokens and cls_attention_mask (integer / boolean outputs: nothing to differentiate)
# --------------------------------------------------------------------------------------------

def _topk_fake(scores, k, largest):
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


topk_tokens = _define_backends("topk_tokens", "Tensor scores, SymInt k, bool largest", "Tensor", _topk_fake,
                               reference.topk_tokens, _triton("topk_mask", "topk_tokens"))


def _mask_fake(cls_attn, ratio_per_row, ratio, seed, mode, mask_prob, show_max, show_ratio_per_row, show_ratio):
    return cls_attn.new_empty(cls_attn.shape, dtype=torch.bool)


cls_attention_mask = _define_backends(
    "cls_attention_mask",
    "Tensor cls_attn, Tensor? ratio_per_row, float ratio, Tensor seed, str mode, float mask_prob, float show_max, "
    "Tensor? show_ratio_per_row, float show_ratio",
    "Tensor", _mask_fake, reference.cls_attention_mask, _triton("topk_mask", "cls_attention_mask"),
)


def _no_grad_setup(ctx, inputs, output):
    pass


# Integer and boolean outputs carry no gradient; registered so that scores that require grad are accepted.
topk_tokens.register_autograd(lambda ctx, grad: (None, None, None, None), setup_context=_no_grad_setup)
cls_attention_mask.register_autograd(lambda ctx, grad: (None,) * 10, setup_context=_no_grad_setup)


# --------------------------------------------------------------------------------------------
# attention with the CLS map
# --------------------------------------------------------------------------------------------

def _attention_fake(q, k, v, scale, return_cls_attn, num_prefix_tokens, backend):
    B, H, L, Dh = q.shape
    num_patches = L - num_prefix_tokens if return_cls_attn else 0
    cls_attn = q.new_empty(B, num_patches, dtype=torch.float32)
    if backend == "triton":
        # [B, H, L, Dh] stored as [B, L, H, Dh]: timm's transpose(1, 2).reshape(B, L, C) is then free.
        out = q.new_empty(B, L, H, Dh).transpose(1, 2)
        return out, cls_attn, q.new_empty(B, H, L, dtype=torch.float32)
    return q.new_empty(B, H, L, Dh), cls_attn, q.new_empty(0, dtype=torch.float32)


def _autocast_off(device_type: str):
    # Autocast stays on inside an operator's implementation; attention picks its own precision
    # (float32 scores and CLS map, ``out`` in the inputs' dtype), as the reference does.
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# Attention implementations besides the backends, for measured dispatch (``fastmask.dispatch``): SDPA
# pinned to one of its backends, the CLS map from the one-launch Triton CLS-row kernel.
SDPA_BACKENDS = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION"}


def _sdpa(q, k, v, scale: float, sdpa_backend: Optional[str]):
    if sdpa_backend is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, sdpa_backend)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _cls_row_fake(q, k, scale, num_prefix_tokens, backend):
    return q.new_empty(q.shape[0], q.shape[2] - num_prefix_tokens, dtype=torch.float32)


def _cls_row_impl(q, k, scale: float, num_prefix_tokens: int, backend: str) -> torch.Tensor:
    """The head-mean CLS attention row over the patch keys, [B, L - p] float32, beside any attention."""
    if backend == "triton":
        return _kernels("cls_row").cls_row(q, k, scale, num_prefix_tokens)
    if backend == "torch":
        with _autocast_off(q.device.type):
            row0 = torch.matmul(q[:, :, :1].float(), k.float().transpose(-2, -1)) * scale
            return torch.softmax(row0, dim=-1)[:, :, 0, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"cls_row: unknown backend {backend!r}; expected 'torch' or 'triton'")


cls_row = _define(
    "cls_row", "(Tensor q, Tensor k, float scale, int num_prefix_tokens, str backend) -> Tensor",
    _cls_row_impl, _cls_row_fake,
)
# The map is an export (AttMask, MaskedKD): it carries no gradient.
cls_row.register_autograd(lambda ctx, grad: (None,) * 5, setup_context=lambda ctx, inputs, output: None)


def _torch_attention(q, k, v, scale: float, return_cls_attn: bool, num_prefix_tokens: int,
                     sdpa_backend: Optional[str] = None, cls_kernel: bool = False):
    """The torch backend: ``out`` from ``F.scaled_dot_product_attention`` (pinned to ``sdpa_backend``
    when given), the CLS map from the score row of query 0 alone ([B, H, 1, L] in float32; or from the
    Triton CLS-row kernel with ``cls_kernel``), so the [B, H, L, L] matrix is never built."""
    B, H, L, Dh = q.shape
    with _autocast_off(q.device.type):
        out = _sdpa(q, k, v, scale, sdpa_backend).contiguous()
        # SDPA's CPU kernels return zeros for a NaN query; the reference and the kernels give the
        # IEEE result, a NaN row: keep that one documented behaviour on every backend.
        out = out.masked_fill(torch.isnan(q).any(-1, keepdim=True), float("nan"))
        if not return_cls_attn:
            cls_attn = q.new_empty(B, 0, dtype=torch.float32)
        else:
            cls_attn = cls_row(q.detach(), k.detach(), scale, num_prefix_tokens, "triton" if cls_kernel else "torch")
    return out, cls_attn, q.new_empty(0, dtype=torch.float32)


def _attention_impl(q, k, v, scale: float, return_cls_attn: bool, num_prefix_tokens: int, backend: str):
    if backend == "torch":
        return _torch_attention(q, k, v, scale, return_cls_attn, num_prefix_tokens)
    if backend in SDPA_BACKENDS:
        from ._backend import _can_run

        cls_kernel = return_cls_attn and _can_run("triton", "attention", q.device)[0]
        return _torch_attention(q, k, v, scale, return_cls_attn, num_prefix_tokens, SDPA_BACKENDS[backend], cls_kernel)
    if backend == "triton":
        out, lse, cls_attn = _kernels("cls_attention").attention_forward(q, k, v, scale, return_cls_attn, num_prefix_tokens)
        if cls_attn is None:
            cls_attn = q.new_empty(q.shape[0], 0, dtype=torch.float32)
        return out, cls_attn, lse
    raise ValueError(f"attention: unknown implementation {backend!r}; expected 'torch', 'triton' or one of "
                     f"{tuple(SDPA_BACKENDS)}")


attention = _define(
    "attention",
    "(Tensor q, Tensor k, Tensor v, float scale, bool return_cls_attn, int num_prefix_tokens, str backend) "
    "-> (Tensor out, Tensor cls_attn, Tensor lse)",
    _attention_impl, _attention_fake,
)


def _attention_backward_fake(dout, q, k, v, out, lse, scale, need_dq, need_dkdv, backend):
    grad = lambda need: q.new_empty(q.shape if need else (0,))  # noqa: E731
    return grad(need_dq), grad(need_dkdv), grad(need_dkdv)


def _attention_backward_impl(dout, q, k, v, out, lse, scale: float, need_dq: bool, need_dkdv: bool, backend: str):
    if backend != "triton":
        raise ValueError(f"attention_backward: backend {backend!r} has no kernel (the torch backend differentiates in torch)")
    dq, dk, dv = _kernels("cls_attention").attention_backward(dout, q, k, v, out, lse, scale, need_dq, need_dkdv)
    # Gradients not asked for are empty tensors (a schema cannot return None); each its own.
    return tuple(q.new_empty(0) if g is None else g for g in (dq, dk, dv))


attention_backward = _define(
    "attention_backward",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool need_dq, bool need_dkdv, "
    "str backend) -> (Tensor, Tensor, Tensor)",
    _attention_backward_impl, _attention_backward_fake,
)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, return_cls_attn, num_prefix_tokens, backend = inputs
    out, _, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _torch_attention_grads(dout, q, k, v, scale: float):
    """Gradients of softmax attention written in differentiable torch ops (float32, then each input's
    dtype): the torch backend's backward, which also differentiates twice."""
    with _autocast_off(q.device.type):
        qf, kf, vf, do = q.float(), k.float(), v.float(), dout.float()
        probs = torch.softmax(torch.matmul(qf, kf.transpose(-2, -1)) * scale, dim=-1)
        dv = torch.matmul(probs.transpose(-2, -1), do)
        dp = torch.matmul(do, vf.transpose(-2, -1))
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * scale
        dq = torch.matmul(ds, kf)
        dk = torch.matmul(ds.transpose(-2, -1), qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _attention_backward(ctx, dout, _grad_cls, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    if ctx.backend != "triton":  # torch and the SDPA implementations
        dq, dk, dv = _torch_attention_grads(dout, q, k, v, ctx.scale)
    else:
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.scale, need_q, need_k or need_v, ctx.backend)
    return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None, None, None, None


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


def _register_attention_flops() -> None:
    """``FlopCounterMode`` counts ``fastmask::attention`` (and its Triton backward) as SDPA: the same
    shapes, the same formulas (it cannot see inside an operator)."""
    from torch.utils import flop_counter

    @flop_counter.register_flop_formula(torch.ops.fastmask.attention)
    def _forward(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)

    @flop_counter.register_flop_formula(torch.ops.fastmask.attention_backward)
    def _backward(dout_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(dout_shape, q_shape, k_shape, v_shape)


_register_attention_flops()

