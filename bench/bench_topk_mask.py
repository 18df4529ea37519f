"""Top-k token selection and AttMask masks: fastmask's kernels against the PyTorch ways of doing it.

    .venv/bin/python -m pytest bench/bench_topk_mask.py -rs --benchmark-json bench/results/topk_mask-<gpu>.json

Shapes: B = 256 ... 4096 rows of N = 196 (ViT-B/16 at 224 px) or 784 (ViT-L/16 at 448 px) float32
CLS attention maps (what ``ops.attention(return_cls_attn=True)`` returns).

Tasks and implementations:
  topk   MaskedKD's keep-set, k = N/2 ids per row, ascending:
           fastmask_triton / fastmask_cuda  ops.topk_tokens
           torch_topk                       torch.topk(...).indices, then sort the ids
           torch_argsort                    torch.argsort(descending) [:, :k], then sort the ids
           torch_compile                    torch.compile(reference.topk_tokens)
  high   AttMask-High with per-sample ratios r ~ U(0.1, 0.5), every row masked:
           fastmask_*                       ops.cls_attention_mask(mode="high")
           torch_argsort                    argsort + scatter_ of (rank < count) (AttMask's recipe)
           torch_topk                       topk(k = 0.5 N) + scatter_ of (position < count)
           torch_compile                    torch.compile of the rank-based reference mask
  hint   AttMask-Hint as in the paper: mask_prob 0.5, r ~ U(0.1, 0.5), show_max 0.1,
         show_ratio ~ U(0.01, 0.05); baselines draw the gate and the reveal keys with torch.rand
         and pick the reveals with a second topk/argsort.

``extra_info``: kernel_ms (median device time from triton.testing.do_bench, CUDA events, L2
flushed; the calls queue behind the flush, so it is device time: the gaps between a baseline's
kernels count, the host's launch cost mostly does not); rows_per_us;
kernels_per_call (CUDA kernels and memsets torch.profiler sees, recorded at the smallest B);
speedup_vs_best_baseline (fastmask only: the fastest torch baseline's kernel_ms / this kernel_ms;
the goal on an H200 is >= 3).  Kernel timings skip without a GPU (the
Triton interpreter's CPU times mean nothing); one CPU case times the torch baselines at a small B.
"""
import functools

import pytest
import torch

from common import compiled, device_ms, fastest_ms, need_gpu, need_gpu_for, timed
from helpers import launched_kernels
from fastmask import ops, reference

BATCHES = (256, 1024, 4096)
TOKENS = (196, 784)
TASKS = ("topk", "high", "hint")
FASTMASK = ("fastmask_triton", "fastmask_cuda")
BASELINES = ("torch_topk", "torch_argsort", "torch_compile")
RATIO, SHOW_MAX, SHOW_RATIO, MASK_PROB = (0.1, 0.5), 0.1, (0.01, 0.05), 0.5


def make_inputs(task, B, N, device):
    g = torch.Generator(device=device).manual_seed(B * 1000 + N)
    attn = torch.rand(B, N, generator=g, device=device).softmax(dim=-1)
    ratio = RATIO[0] + (RATIO[1] - RATIO[0]) * torch.rand(B, generator=g, device=device)
    show = SHOW_RATIO[0] + (SHOW_RATIO[1] - SHOW_RATIO[0]) * torch.rand(B, generator=g, device=device)
    return attn, ratio, show


# ---------------------------------------------------------------------------------------------
# the torch baselines
# ---------------------------------------------------------------------------------------------

def _rank(order):
    rank = torch.empty_like(order)
    return rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


def topk_via_topk(attn, k):
    return torch.sort(torch.topk(attn, k, dim=1).indices, dim=1).values


def topk_via_argsort(attn, k):
    return torch.sort(torch.argsort(attn, dim=1, descending=True)[:, :k], dim=1).values


def mask_via_argsort(attn, ratio, show=None):
    B, N = attn.shape
    counts = torch.floor(ratio.double() * N).long()
    rank = _rank(torch.argsort(attn, dim=1, descending=True))
    mask = rank < counts[:, None]
    if show is not None:
        candidates = rank < int(SHOW_MAX * N)
        keys = torch.where(candidates, torch.rand(B, N, device=attn.device), 2.0)
        revealed = _rank(torch.argsort(keys, dim=1)) < torch.floor(show.double() * N).long()[:, None]
        mask &= ~revealed
        mask &= (torch.rand(B, device=attn.device) < MASK_PROB)[:, None]
    return mask


def mask_via_topk(attn, ratio, show=None):
    B, N = attn.shape
    counts = torch.floor(ratio.double() * N).long()
    kmax = int(RATIO[1] * N)  # static upper bound of the per-sample counts (no host sync)
    top = torch.topk(attn, kmax, dim=1).indices
    position = torch.arange(kmax, device=attn.device).expand(B, kmax)
    mask = torch.zeros(B, N, dtype=torch.bool, device=attn.device).scatter_(1, top, position < counts[:, None])
    if show is not None:
        pool = int(SHOW_MAX * N)
        smax = max(int(SHOW_RATIO[1] * N), 1)
        keys = torch.rand(B, pool, device=attn.device)
        pick = torch.topk(keys, smax, dim=1, largest=False).indices  # uniform reveals among the pool
        reveal_pos = torch.arange(smax, device=attn.device).expand(B, smax) < torch.floor(show.double() * N).long()[:, None]
        revealed_ids = torch.gather(top[:, :pool], 1, pick)
        mask.scatter_(1, revealed_ids, mask.gather(1, revealed_ids) & ~reveal_pos)
        mask &= (torch.rand(B, device=attn.device) < MASK_PROB)[:, None]
    return mask


def reference_mask(attn, ratio, show=None):
    # The reference's rank formulation (mask_prob < 1 needs its host-side Philox gate, which
    # torch.compile cannot trace; the compiled variant gates with torch.rand like the baselines).
    N = attn.shape[1]
    rank = reference.rank_tokens(attn, largest=True)
    mask = rank < torch.floor(ratio.double() * N).long()[:, None]
    if show is not None:
        candidates = rank < int(SHOW_MAX * N)
        keys = torch.where(candidates, torch.rand_like(attn), 2.0)
        mask &= ~(reference.rank_tokens(keys, largest=False) < torch.floor(show.double() * N).long()[:, None])
        mask &= (torch.rand(attn.shape[0], device=attn.device) < MASK_PROB)[:, None]
    return mask


def make_call(impl, task, attn, ratio, show):
    N = attn.shape[1]
    k = N // 2
    backend = impl.split("_")[1] if impl in FASTMASK else None
    hint = task == "hint"
    if task == "topk":
        if backend:
            return lambda: ops.topk_tokens(attn, k, backend=backend)
        fn = {"torch_topk": topk_via_topk, "torch_argsort": topk_via_argsort,
              "torch_compile": compiled("topk", reference.topk_tokens)}[impl]
        return lambda: fn(attn, k)
    if backend:
        kw = dict(mode="hint", mask_prob=MASK_PROB, show_max=SHOW_MAX, show_ratio=show) if hint else dict(mode="high")
        return lambda: ops.cls_attention_mask(attn, ratio, seed=1, backend=backend, **kw)
    fn = {"torch_topk": mask_via_topk, "torch_argsort": mask_via_argsort,
          "torch_compile": compiled(f"mask_{hint}", reference_mask)}[impl]
    return lambda: fn(attn, ratio, show if hint else None)


@functools.cache
def kernel_ms(impl, task, B, N):
    """Median device time (ms) of one call, cached across the benchmarks."""
    call = make_call(impl, task, *make_inputs(task, B, N, torch.device("cuda")))
    with ops.value_checks(False):  # production setting: no host syncs for value checks
        return device_ms(call)


@pytest.mark.parametrize("N", TOKENS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("impl", FASTMASK + BASELINES)
def test_topk_mask(benchmark, impl, task, B, N):
    need_gpu_for(impl)
    attn, ratio, show = make_inputs(task, B, N, torch.device("cuda"))
    call = make_call(impl, task, attn, ratio, show)
    info = benchmark.extra_info
    info.update(impl=impl, task=task, shape=dict(B=B, N=N, dtype="float32"))
    ms = kernel_ms(impl, task, B, N)
    info["kernel_ms"] = round(ms, 5)
    info["rows_per_us"] = round(B / (ms * 1e3), 3)
    if impl in FASTMASK:
        info["speedup_vs_best_baseline"] = round(fastest_ms(kernel_ms, BASELINES, task, B, N) / ms, 3)
    with ops.value_checks(False):
        if B == BATCHES[0]:
            info["kernels_per_call"] = len(launched_kernels(call))
        call()
        benchmark(timed(call))


@pytest.mark.parametrize("task", TASKS)
def test_fastmask_agrees_with_baselines(task):
    """Sanity check before trusting the timings: the high/topk outputs are the same sets."""
    need_gpu("kernel comparisons")
    attn, ratio, show = make_inputs(task, 1024, 196, torch.device("cuda"))
    if task == "topk":
        out = ops.topk_tokens(attn, 98, backend="triton")
        assert torch.equal(out, topk_via_argsort(attn, 98))
    elif task == "high":
        out = ops.cls_attention_mask(attn, ratio, mode="high", backend="triton")
        assert torch.equal(out, mask_via_argsort(attn, ratio))
    else:
        out = ops.cls_attention_mask(attn, ratio, mode="hint", mask_prob=MASK_PROB, show_max=SHOW_MAX,
                                     show_ratio=show, seed=1, backend="triton")
        full = ops.cls_attention_mask(attn, ratio, mode="high", backend="triton")
        assert not bool((out & ~full).any())


@pytest.mark.parametrize("impl", ("torch_topk", "torch_argsort"))
@pytest.mark.parametrize("task", TASKS)
def test_torch_baselines_cpu_small(benchmark, impl, task):
    """The eager torch baselines on the CPU at B = 64, N = 196 (runs anywhere)."""
    attn, ratio, show = make_inputs(task, 64, 196, torch.device("cpu"))
    call = make_call(impl, task, attn, ratio, show)
    out = call()
    if task != "topk":
        counts = torch.floor(ratio.double() * 196).long()
        if task == "high":
            assert torch.equal(out.sum(1), counts)
        else:
            assert bool((out.sum(1) <= counts).all())
    benchmark.extra_info.update(impl=impl, task=task, shape=dict(B=64, N=196), device="cpu")
    benchmark(call)
