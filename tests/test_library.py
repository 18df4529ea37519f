"""fastmask's ops as torch.library operators (``fastmask/library.py``).

* ``torch.library.opcheck`` of every operator on every backend that runs here (schema, fake, autograd
  registration, AOT dispatch with dynamic shapes);
* FakeTensor propagation for every operator, the extension's ``fastmask::cuda_*`` included (their fakes
  are registered in Python, so this works without the extension built and on fake CUDA tensors);
* each public op under ``torch.compile(fullgraph=True)`` with 0 graph breaks on the torch and the
  Triton path (``torch._dynamo.explain``), with the eager results and gradients;
* two calls of one compiled function draw different masks (the seed is drawn on the device per call);
* a forward on the ``meta`` device.
Shapes are small: under the Triton interpreter every opcheck case runs the kernels several times.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastmask import library, ops, reference
from fastmask.philox import seed_tensor
from helpers import DEVICE, HAS_CUDA, KERNEL_BACKENDS

BACKENDS = ("torch",) + KERNEL_BACKENDS
OPS = torch.ops.fastmask


def _inputs(device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(0)
    B, N, D, K, H, L, Dh = 2, 7, 5, 3, 2, 9, 8

    def rand(*shape, grad=requires_grad):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    ids = torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)]).to(device)
    return dict(
        x=rand(B, N, D), ids=ids, pos=rand(1, N, D), fill=rand(D), kept=rand(B, K, D),
        mask=(torch.rand(B, N, generator=g) < 0.5).to(device), seed=seed_tensor(seed=3, device=device),
        scores=torch.rand(B, N, generator=g).to(device), ratio=torch.tensor([0.3, 0.6], device=device),
        q=rand(B, H, L, Dh), k=rand(B, H, L, Dh), v=rand(B, H, L, Dh), B=B, N=N, K=K,
    )


def _cases(backend, t):
    """(operator, args) per case: every operator and its optional-argument branches."""
    cases = {
        "gather_tokens+pos": (OPS.gather_tokens, (t["x"], t["ids"], t["pos"], backend)),
        "gather_tokens": (OPS.gather_tokens, (t["x"], t["ids"], None, backend)),
        "scatter_tokens+fill": (OPS.scatter_tokens, (t["kept"], t["ids"], t["N"], t["fill"], backend)),
        "scatter_tokens": (OPS.scatter_tokens, (t["kept"], t["ids"], t["N"], None, backend)),
        "apply_mask_token": (OPS.apply_mask_token, (t["x"], t["mask"], t["fill"], backend)),
        "random_keep": (OPS.random_keep, (t["seed"], t["B"], t["N"], t["K"], backend)),
        "topk_tokens": (OPS.topk_tokens, (t["scores"], t["K"], True, backend)),
        "cls_attention_mask hint": (OPS.cls_attention_mask,
                                    (t["scores"], t["ratio"], 0.0, t["seed"], "hint", 0.5, 0.5, None, 0.2, backend)),
        "cls_attention_mask low": (OPS.cls_attention_mask,
                                   (t["scores"], None, 0.4, t["seed"], "low", 1.0, 0.1, None, 0.0, backend)),
        "attention+cls": (OPS.attention, (t["q"], t["k"], t["v"], 8**-0.5, True, 1, backend)),
        "attention": (OPS.attention, (t["q"], t["k"], t["v"], 8**-0.5, False, 2, backend)),
    }
    if backend == "cuda":  # attention has no CUDA C++ kernel
        cases = {name: case for name, case in cases.items() if not name.startswith("attention")}
    if backend == "triton":
        with torch.no_grad():
            out, _, lse = OPS.attention(t["q"], t["k"], t["v"], 8**-0.5, False, 1, backend)
        cases["attention_backward"] = (OPS.attention_backward, (
            torch.randn_like(out), t["q"].detach(), t["k"].detach(), t["v"].detach(), out, lse, 8**-0.5, True, True,
            backend))
    return cases


# The Triton interpreter makes each opcheck case cost seconds: the triton backend checks the
# operators' schema/fake/autograd registration on the fewer cases that cover every operator.
_TRITON_OPCHECK = ("gather_tokens+pos", "scatter_tokens+fill", "apply_mask_token", "random_keep", "topk_tokens",
                   "cls_attention_mask hint", "attention+cls", "attention_backward")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_operator(backend):
    t = _inputs(DEVICE)
    for name, (op, args) in _cases(backend, t).items():
        if backend != "torch" and name not in _TRITON_OPCHECK:
            continue
        torch.library.opcheck(op, args)


def test_every_public_op_has_an_operator_with_one_schema():
    # One schema per op: the backend is an argument, the extension's kernel takes the same ones without it.
    for name in ("gather_tokens", "scatter_tokens", "apply_mask_token", "random_keep", "topk_tokens",
                 "cls_attention_mask"):
        schema = getattr(OPS, name).default._schema
        cuda = getattr(OPS, f"cuda_{name}").default._schema
        assert [a.name for a in schema.arguments] == [a.name for a in cuda.arguments] + ["backend"], name
        assert [str(a.type) for a in schema.arguments[:-1]] == [str(a.type) for a in cuda.arguments], name
        assert len(schema.returns) == len(cuda.returns), name
    assert str(OPS.attention.default._schema.arguments[-1].type) == "str"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fake_tensor_propagation_for_every_operator(device):
    """Shapes, dtypes and devices from the fakes alone: fake CUDA tensors need no GPU, and the
    ``cuda_*`` operators' fakes work whether or not ``fastmask._C`` is built."""
    with FakeTensorMode():
        t = _inputs(device, requires_grad=False)
        B, N, K = t["B"], t["N"], t["K"]
        backends = ("torch", "triton") + (("cuda",) if device == "cuda" else ())
        for backend in backends:
            for name, (op, args) in _cases(backend, t).items():
                if backend == "cuda":
                    op = getattr(OPS, "cuda_" + op._qualified_op_name.split("::")[1])
                    args = args[:-1]
                out = op(*args)
                outs = out if isinstance(out, tuple) else (out,)
                assert all(o.device.type == device for o in outs), (backend, name)
        x = t["x"]
        assert OPS.cuda_gather_tokens(x, t["ids"], None).shape == (B, K, x.shape[2])
        ids_keep, mask, restore = OPS.random_keep(t["seed"], B, N, K, "torch")
        assert (ids_keep.shape, mask.shape, mask.dtype, restore.dtype) == ((B, K), (B, N), torch.bool, torch.int64)
        out, cls, _ = OPS.attention(t["q"], t["k"], t["v"], 0.3, True, 1, "triton")
        assert out.shape == t["q"].shape and cls.shape == (B, t["q"].shape[2] - 1) and cls.dtype == torch.float32
        # The Triton output is laid out [B, L, H, Dh] (timm's transpose that follows is free): the fake says so.
        assert out.transpose(1, 2).is_contiguous()


def test_cuda_operators_are_defined_without_the_extension():
    for name in ("gather_tokens", "scatter_tokens", "apply_mask_token", "random_keep", "topk_tokens",
                 "cls_attention_mask"):
        assert hasattr(OPS, f"cuda_{name}")
    x = torch.empty(2, 5, 4, device="meta")
    assert OPS.cuda_scatter_tokens(x, torch.empty(2, 5, dtype=torch.long, device="meta"), 9, None).shape == (2, 9, 4)


# --------------------------------------------------------------------------------------------
# torch.compile: no graph breaks, same results
# --------------------------------------------------------------------------------------------

def _public_calls(backend):
    """Each public op as a user calls it (seeds drawn inside, value checks on: skipped when traced)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 6, generator=g).to(DEVICE)
    ids = torch.tensor([[0, 3, 5], [1, 2, 9]], device=DEVICE)
    mask = (torch.rand(2, 13, generator=g) < 0.5).to(DEVICE)
    token = torch.randn(6, generator=g).to(DEVICE)
    attn = torch.rand(2, 13, generator=g).to(DEVICE)
    ratio = torch.tensor([0.2, 0.45], device=DEVICE)
    q = torch.randn(2, 2, 9, 8, generator=g).to(DEVICE)
    return {
        "gather_tokens": (lambda x: ops.gather_tokens(x, ids, backend=backend), x),
        "scatter_tokens": (lambda x: ops.scatter_tokens(x[:, :3], ids, 13, token, backend=backend), x),
        "apply_mask_token": (lambda x: ops.apply_mask_token(x, mask, token, backend=backend), x),
        "random_masking": (lambda x: ops.random_masking(x, 0.5, seed=3, backend=backend).x_kept, x),
        "random_keep": (lambda a: ops.random_keep(2, 13, 0.5, seed=4, device=a.device, backend=backend).mask, attn),
        "topk_tokens": (lambda a: ops.topk_tokens(a, 4, backend=backend), attn),
        "cls_attention_mask": (lambda a: ops.cls_attention_mask(a, ratio, mode="hint", mask_prob=0.5, show_max=0.2,
                                                                 show_ratio=0.1, seed=5, backend=backend), attn),
        "attention": (lambda q: ops.attention(q, q, q, return_cls_attn=True, backend=backend), q),
    }


def graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_each_op_compiles_with_no_graph_break(backend):
    for name, (fn, arg) in _public_calls(backend).items():
        assert graph_breaks(fn, arg) == 0, name
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        got, want = compiled(arg), fn(arg)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_compiled_gradients_match_eager(backend):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 6, generator=g).to(DEVICE).requires_grad_()
    token = torch.randn(6, generator=g).to(DEVICE).requires_grad_()
    q = torch.randn(2, 2, 11, 8, generator=g).to(DEVICE).requires_grad_()

    def step(x, token, q):
        masked = ops.random_masking(x, 0.5, seed=7, backend=backend)
        full = ops.scatter_tokens(masked.x_kept, masked.ids_keep, 11, token, backend=backend)
        filled = ops.apply_mask_token(full, masked.mask, token * 2, backend=backend)
        out, cls = ops.attention(q, q, q, return_cls_attn=True, backend=backend)
        return filled.square().sum() + out.square().sum() + cls.sum()

    want = torch.autograd.grad(step(x, token, q), (x, token, q))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, token, q), (x, token, q))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_two_calls_of_one_compiled_function_draw_different_masks(backend):
    """The seed is a device draw inside the compiled graph, not a constant baked in at trace time."""
    attn = torch.rand(4, 49, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x = torch.randn(4, 49, 8, device=DEVICE)

    def masks(x, attn):
        keep = ops.random_masking(x, 0.75, backend=backend).mask
        hint = ops.cls_attention_mask(attn, 0.5, mode="hint", mask_prob=0.5, show_max=0.3, show_ratio=0.2,
                                      backend=backend)
        return keep, hint

    torch._dynamo.reset()
    compiled = torch.compile(masks, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    first = compiled(x, attn)
    second = compiled(x, attn)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    # Reproducible from torch's seed like eager code: the same draws as the eager function.
    torch.manual_seed(0)
    eager = masks(x, attn)
    assert torch.equal(eager[0], first[0]) and torch.equal(eager[1], first[1])
    assert graph_breaks(masks, x, attn) == 0
    torch._dynamo.reset()


def test_generator_argument_under_compile_draws_from_the_default_generator():
    """A torch.Generator cannot enter a traced graph: compiled code draws from the device's default
    generator (seeded by torch.manual_seed), with no graph break and fresh masks per call."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 20, 4)

    def fn(x):
        return ops.random_masking(x, 0.5, generator=gen).mask

    assert graph_breaks(fn, x) == 0
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    a, b = compiled(x), compiled(x)
    assert not torch.equal(a, b)
    torch.manual_seed(1)
    assert torch.equal(ops.random_masking(x, 0.5).mask, a)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["random", "block", "attmask_high", "attmask_hint"])
def test_mask_policies_compile_with_no_graph_break(name):
    """No host sync on any masked path (a read-back would break the graph), BEiT blocks included;
    the generator argument is the default generator once traced."""
    from fastmask import masking

    options = dict(ratio=(0.1, 0.5), mask_prob=0.5) if name in ("random", "block") else {}
    if name == "block":  # fewer tries to trace (the loop unrolls): at most 14 patches in blocks of >= 16
        options["ratio"] = (0.1, 0.3)
    policy = masking.build_mask_policy(name, **options)
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(4, 49)

    def draw(attn):
        return policy(4, (7, 7), cls_attn=attn, generator=gen, device="cpu")

    assert graph_breaks(draw, attn) == 0
    torch._dynamo.reset()
    compiled = torch.compile(draw, backend="eager", fullgraph=True)
    a, b = compiled(attn), compiled(attn)
    assert a.shape == (4, 49) and a.dtype == torch.bool and not torch.equal(a, b)
    torch._dynamo.reset()


def test_export_keeps_the_operators():
    """torch.export sees each op as one fastmask:: operator (the seed an input of the program)."""

    class Step(torch.nn.Module):
        def forward(self, x, q, seed):
            masked = ops.random_masking(x, 0.5, seed=seed, backend="torch")
            out, cls = ops.attention(q, q, q, return_cls_attn=True, backend="torch")
            return masked.x_kept, out, ops.cls_attention_mask(cls, 0.3, mode="hint", show_ratio=0.05, seed=seed,
                                                              backend="torch")

    args = (torch.randn(2, 16, 8), torch.randn(2, 2, 17, 8), seed_tensor(seed=3))
    program = torch.export.export(Step(), args)
    targets = [str(n.target) for n in program.graph.nodes if "fastmask" in str(n.target)]
    assert targets == ["fastmask.random_keep.default", "fastmask.gather_tokens.default", "fastmask.attention.default",
                       "fastmask.cls_attention_mask.default"]
    for got, want in zip(program.module()(*args), Step()(*args)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# meta device
# --------------------------------------------------------------------------------------------

def test_ops_run_on_the_meta_device():
    x = torch.empty(2, 196, 384, device="meta", requires_grad=True)
    masked = ops.random_masking(x, 0.75)
    assert masked.x_kept.shape == (2, 49, 384) and masked.x_kept.device.type == "meta"
    back = ops.scatter_tokens(masked.x_kept, masked.ids_keep, 196, torch.empty(384, device="meta"))
    assert back.shape == (2, 196, 384)
    q = torch.empty(2, 6, 197, 64, device="meta", requires_grad=True)
    out, cls = ops.attention(q, q, q, return_cls_attn=True)
    assert out.shape == q.shape and cls.shape == (2, 196) and cls.dtype == torch.float32
    out.sum().backward()
    mask = ops.cls_attention_mask(cls, torch.empty(2, device="meta"), mode="hint", show_ratio=0.05)
    assert mask.shape == (2, 196) and mask.dtype == torch.bool
    assert ops.topk_tokens(cls, 98).shape == (2, 98)
    assert ops.apply_mask_token(x, mask, torch.empty(384, device="meta")).device.type == "meta"
    keep = ops.random_keep(2, 196, 0.5, device="meta")
    assert keep.ids_keep.shape == (2, 98) and keep.mask.shape == (2, 196)


# --------------------------------------------------------------------------------------------
# random_keep: ids and mask together
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,ratio", [(197, 0.75), (196, 0.0), (50, 0.99), (1, 0.5)])
def test_random_keep_is_random_masking_without_the_gather(backend, N, ratio):
    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(3, N, 4, device=device)
    got = ops.random_keep(3, N, ratio, seed=11, device=device, backend=backend)
    ref = reference.random_masking(x, ratio, 11)
    for name in ("ids_keep", "mask", "ids_restore"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert bool((got.mask.sum(1) == N - reference.keep_count(N, ratio)).all())
    assert not bool(got.mask.gather(1, got.ids_keep).any())


def test_random_keep_checks_its_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        ops.random_keep(-1, 10, 0.5)
    with pytest.raises(ValueError, match="num_tokens"):
        ops.random_keep(2, 2.5, 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.random_keep(2, 10, 1.0)
    with pytest.raises(TypeError, match="mask_ratio"):
        ops.random_keep(2, 10, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="seed"):
        ops.random_keep(2, 10, 0.5, seed=-3)


def test_seed_tensor_keeps_the_philox_streams():
    """The same seeds give the same bits as the int seeds did (tests/test_philox.py pins the streams):
    an int seed becomes a one-element int64 tensor with the same 64 bits."""
    from fastmask.philox import philox4x32

    offsets = torch.arange(64)
    for seed in (0, 12345, 2**31 - 2, 2**40 + 7, 2**63 + 5):
        t = seed_tensor(seed=seed)
        assert t.shape == (1,) and t.dtype == torch.int64
        for a, b in zip(philox4x32(t, offsets), philox4x32(seed, offsets)):
            assert torch.equal(a, b), seed
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    from fastmask.philox import draw_seed

    assert int(seed_tensor(g1)) == draw_seed(g2)  # CPU generators: the seed draw_seed gave


# --------------------------------------------------------------------------------------------
# GPU: CUDA-graph replay draws new masks
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_replay_draws_new_masks(backend):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 196, 64, device="cuda")
    attn = torch.rand(8, 196, device="cuda")
    ratio = torch.full((8,), 0.4, device="cuda")

    def step():
        keep = ops.random_masking(x, 0.75, generator=gen, backend=backend).mask
        hint = ops.cls_attention_mask(attn, ratio, mode="hint", mask_prob=0.5, show_ratio=0.05, generator=gen,
                                      backend=backend)
        return keep, hint

    with ops.value_checks(False):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # compile, autotune, allocate outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            keep, hint = step()
    graph.replay()
    first = keep.clone(), hint.clone()
    graph.replay()
    assert not torch.equal(first[0], keep) and not torch.equal(first[1], hint)
    assert bool((keep.sum(1) == 196 - 49).all())
