"""Token gather / scatter: fastmask's kernels against the PyTorch ways of moving token rows.

    .venv/bin/python -m pytest bench/bench_token_gather.py -rs --benchmark-json bench/results/token_gather-<gpu>.json

Shapes (GPU): ViT-B/16 at 224 px, B = 256, N = 196, D = 768, bfloat16, keeping K = 49 (MAE's 75 %
masking) or K = 98 (50 %) tokens per row.

Tasks and implementations:
  gather      x_kept = x[b, ids_keep[b]]                      (MAE encoder input)
  gather_pos  x_kept = (x + pos_embed)[b, ids_keep[b]]        (MAE adds positions, then drops)
  scatter     full = scatter(x_kept, ids_keep, N, fill=mask_token)   (MAE decoder input)
    fastmask_triton / fastmask_cuda   ops.gather_tokens / ops.scatter_tokens (one pass, fused add/fill)
    torch_gather                      torch.gather / Tensor.scatter with the index expanded over D
    torch_index_select                index_select / index_copy_ on the flattened [B*N, D] rows
    torch_compile                     torch.compile of fastmask.reference's expression
  random_masking  MAE's random_masking at mask_ratio = 1 - K/N: ids_keep, mask, ids_restore, x_kept
    fastmask_*                        ops.random_masking (device Philox keys + K-th-smallest select)
    torch_gather / torch_index_select MAE's recipe: torch.rand noise, argsort, argsort, then the gather
    torch_compile                     torch.compile of MAE's recipe (torch.gather)

``extra_info``: kernel_ms (GPU: median device time from triton.testing.do_bench with L2 flushed;
CPU: pytest-benchmark's median); gbs = bytes that must move (token rows read + written, ids, and
pos_embed rows read) / time; copy_fraction = gbs / the measured device-to-device copy bandwidth
(fixture copy_bandwidth_gbs, same read+write accounting); for fastmask, speedup_vs_best_baseline.
Goal on an H200: copy_fraction >= 0.85 and faster than every baseline.  Kernel timings skip without
a GPU (the Triton interpreter's CPU times mean nothing); the torch baselines also run on the CPU at
a smaller shape (there the rows sit in CPU caches, so copy_fraction can exceed 1).
"""
import functools

import pytest
import torch

from common import HAS_CUDA, compiled, device_ms, fastest_ms, need_gpu_for, timed
from fastmask import ops, reference
from fastmask._backend import _can_run

FASTMASK = ("fastmask_triton", "fastmask_cuda")
BASELINES = ("torch_gather", "torch_index_select", "torch_compile")
TASKS = ("gather", "gather_pos", "scatter", "random_masking")
GPU_SHAPE = dict(B=256, N=196, D=768)
CPU_SHAPE = dict(B=16, N=196, D=768)
KEEP = (49, 98)
DTYPE = torch.bfloat16


def make_inputs(B, N, D, K, device):
    g = torch.Generator(device="cpu").manual_seed(B * 7 + K)
    x = torch.randn(B, N, D, generator=g).to(device=device, dtype=DTYPE)
    ids_keep = torch.sort(torch.rand(B, N, generator=g).argsort(dim=1)[:, :K], dim=1).values.to(device)
    pos_embed = torch.randn(1, N, D, generator=g).to(device=device, dtype=DTYPE)
    x_kept = torch.randn(B, K, D, generator=g).to(device=device, dtype=DTYPE)
    mask_token = torch.randn(D, generator=g).to(device=device, dtype=DTYPE)
    return x, ids_keep, pos_embed, x_kept, mask_token


def bytes_moved(task, B, N, D, K):
    """What any implementation must read and write at least (the copy-bandwidth accounting)."""
    row = D * DTYPE.itemsize
    ids = B * K * 8
    if task == "gather":
        return 2 * B * K * row + ids
    if task == "gather_pos":
        return 2 * B * K * row + ids + N * row  # pos_embed rows are read once (they stay in L2)
    if task == "scatter":
        return B * K * row + B * N * row + ids + row  # read kept rows, write every row, read the fill
    # random_masking: the gather, plus writing ids_keep (counted above), mask and ids_restore.
    return 2 * B * K * row + ids + B * N * (1 + 8)


# ---------------------------------------------------------------------------------------------
# the torch baselines
# ---------------------------------------------------------------------------------------------

def flat_rows(ids, num_tokens):
    """ids [B, K] per sample -> row numbers of the flattened [B*N, D] tensor."""
    return (ids + torch.arange(ids.shape[0], device=ids.device)[:, None] * num_tokens).reshape(-1)


def gather_index_select(x, ids, pos_embed=None):
    B, N, D = x.shape
    out = x.reshape(B * N, D).index_select(0, flat_rows(ids, N)).view(B, ids.shape[1], D)
    if pos_embed is not None:
        # Gather first, then add only the kept positions: the cheap order, same numerics as the reference.
        pos = pos_embed.reshape(N, D).index_select(0, ids.reshape(-1)).view_as(out)
        out = (out.float() + pos.float()).to(x.dtype)
    return out


def scatter_index_copy(x_kept, ids, num_tokens, fill):
    B, K, D = x_kept.shape
    out = fill.reshape(1, D).expand(B * num_tokens, D).clone()
    out.index_copy_(0, flat_rows(ids, num_tokens), x_kept.reshape(B * K, D))
    return out.view(B, num_tokens, D)


def mae_random_masking(x, mask_ratio, gather="gather"):
    """MAE's random_masking (models_mae.py), the recipe fastmask replaces."""
    B, N, D = x.shape
    K = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K]
    if gather == "gather":
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    else:
        x_kept = x.reshape(B * N, D).index_select(0, flat_rows(ids_keep, N)).view(B, K, D)
    mask = torch.ones(B, N, device=x.device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_keep, ids_restore


def make_call(impl, task, inputs):
    x, ids, pos_embed, x_kept, mask_token = inputs
    N = x.shape[1]
    pos = pos_embed if task == "gather_pos" else None
    if task == "random_masking":
        mask_ratio = 1 - ids.shape[1] / N
        if impl in FASTMASK:
            return lambda: ops.random_masking(x, mask_ratio, seed=1, backend=impl.split("_")[1])
        fn = {"torch_gather": mae_random_masking,
              "torch_index_select": lambda x_, r: mae_random_masking(x_, r, gather="index_select"),
              "torch_compile": compiled("mae", mae_random_masking)}[impl]
        return lambda: fn(x, mask_ratio)
    if impl in FASTMASK:
        backend = impl.split("_")[1]
        if task == "scatter":
            return lambda: ops.scatter_tokens(x_kept, ids, N, mask_token, backend=backend)
        return lambda: ops.gather_tokens(x, ids, pos_embed=pos, backend=backend)
    if task == "scatter":
        fn = {"torch_gather": reference.scatter_tokens, "torch_index_select": scatter_index_copy,
              "torch_compile": compiled("scatter", reference.scatter_tokens)}[impl]
        return lambda: fn(x_kept, ids, N, mask_token)
    fn = {"torch_gather": reference.gather_tokens, "torch_index_select": gather_index_select,
          "torch_compile": compiled(f"gather_{task}", reference.gather_tokens)}[impl]
    return lambda: fn(x, ids, pos)


@functools.cache
def kernel_ms(impl, task, K):
    """Median device time (ms) of one call at the GPU shape, cached across the benchmarks."""
    call = make_call(impl, task, make_inputs(**GPU_SHAPE, K=K, device=torch.device("cuda")))
    with ops.value_checks(False):  # production setting: no host syncs for index checks
        return device_ms(call)


def record(info, task, shape, K, ms, copy_gbs):
    gbs = bytes_moved(task, shape["B"], shape["N"], shape["D"], K) / (ms * 1e-3) / 1e9
    info["kernel_ms"] = round(ms, 5)
    info["gbs"] = round(gbs, 2)
    info["copy_bandwidth_gbs"] = round(copy_gbs, 1)
    info["copy_fraction"] = round(gbs / copy_gbs, 3)


@pytest.mark.parametrize("K", KEEP)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("impl", FASTMASK + BASELINES)
def test_token_gather(benchmark, copy_bandwidth_gbs, impl, task, K):
    need_gpu_for(impl)
    info = benchmark.extra_info
    info.update(impl=impl, task=task, shape=dict(GPU_SHAPE, K=K, dtype="bfloat16"), device="cuda")
    record(info, task, GPU_SHAPE, K, kernel_ms(impl, task, K), copy_bandwidth_gbs)
    if impl in FASTMASK:
        info["speedup_vs_best_baseline"] = round(fastest_ms(kernel_ms, BASELINES, task, K) / info["kernel_ms"], 3)
    call = make_call(impl, task, make_inputs(**GPU_SHAPE, K=K, device=torch.device("cuda")))
    with ops.value_checks(False):
        call()
        benchmark(timed(call))


@pytest.mark.parametrize("task", TASKS)
def test_fastmask_agrees_with_baselines(task):
    """Sanity check before trusting the timings: every implementation returns the same tensor.

    On a CPU it needs the Triton interpreter (TRITON_INTERPRET=1) and runs at a small shape."""
    shape = dict(B=256, N=196, D=768) if HAS_CUDA else dict(B=2, N=50, D=64)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    op = {"scatter": "scatter_tokens", "random_masking": "random_masking"}.get(task, "gather_tokens")
    runnable = {impl: _can_run(impl.split("_")[1], op, device) for impl in FASTMASK}
    kernels = [impl for impl, (ok, _) in runnable.items() if ok]
    if not kernels:
        pytest.skip("no fastmask kernel backend runs here: " + "; ".join(why for _, why in runnable.values()))
    inputs = make_inputs(**shape, K=13, device=device)
    if task == "random_masking":  # the baselines draw torch.rand noise: compare with the reference
        x, N = inputs[0], inputs[0].shape[1]
        ref = reference.random_masking(x, 1 - 13 / N, 1)
        for impl in kernels:
            got = make_call(impl, task, inputs)()
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), impl
        return
    impls = kernels + ["torch_gather", "torch_index_select"]
    outs = {impl: make_call(impl, task, inputs)() for impl in impls}
    for impl, out in outs.items():
        assert torch.equal(out, outs["torch_gather"]), impl


@pytest.mark.parametrize("K", KEEP)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("impl", ("torch_gather", "torch_index_select"))
def test_torch_baselines_cpu(benchmark, copy_bandwidth_gbs, impl, task, K):
    """The eager torch baselines on the CPU at B = 16 (runs anywhere; CPU memory bandwidth)."""
    if HAS_CUDA:
        pytest.skip("a GPU is present: the baselines are timed on it by test_token_gather")
    call = make_call(impl, task, make_inputs(**CPU_SHAPE, K=K, device=torch.device("cpu")))
    info = benchmark.extra_info
    info.update(impl=impl, task=task, shape=dict(CPU_SHAPE, K=K, dtype="bfloat16"), device="cpu")
    benchmark(call)
    record(info, task, CPU_SHAPE, K, benchmark.stats.stats.median * 1e3, copy_bandwidth_gbs)
