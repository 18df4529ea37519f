"""Attention with the CLS map: fastmask's Triton kernel against SDPA (flash), xformers and the
explicit softmax that people use to get the map today.

    .venv/bin/python -m pytest bench/bench_attention.py -rs --benchmark-json bench/results/attention-<gpu>.json

Shapes are ViT-S/16 and ViT-B/16 at 224 px (L = 197 tokens, H = 6 / 12 heads, Dh = 64) for
B = 64 ... 512, bf16, with q/k/v as the strided views of one qkv projection that timm produces.
Modes: ``fwd`` (forward only, as for a teacher) and ``fwd_bwd`` (forward plus dq/dk/dv).

Implementations:
  fastmask_cls     ops.attention(return_cls_attn=True, backend="triton")  (the map comes with the output)
  fastmask         ops.attention(backend="triton")      (same kernel compiled without the export)
  dispatch_cls     ops.attention(return_cls_attn=True)  measured dispatch (fastmask.dispatch): records
  dispatch         ops.attention()                      every candidate's time and the choice
  sdpa_flash       F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION)  (no map)
  sdpa_cudnn       ... under sdpa_kernel(CUDNN_ATTENTION), sdpa_efficient under EFFICIENT_ATTENTION
  sdpa_<b>_cls     SDPA backend <b> + the one-launch CLS-row kernel (kernels/cls_row.py) for the map
  xformers         xformers.ops.memory_efficient_attention                           (no map)
  explicit_cls     softmax(q k^T * scale) materialised, map = probs[:, :, 0, 1:].mean(1), out = probs @ v

What each benchmark records in ``extra_info``:
  kernel_ms             median device time per call from ``triton.testing.do_bench`` (CUDA events,
                        L2 flushed between calls); the pytest-benchmark timing around it also includes
                        Python/launch overhead and a device sync per call
  tflops                attention matmul FLOPs / kernel_ms (fwd 4*B*H*L^2*Dh; fwd_bwd 2.5x more)
  peak_extra_mb         torch.cuda.max_memory_allocated() during one call minus what was allocated
                        before it (outputs included; for explicit_cls the [B, H, L, L] matrices)
  ratio_vs_sdpa_flash   kernel_ms / the SDPA flash kernel_ms at the same shape and mode (< 1 = faster)
  ratio_vs_best_sdpa    kernel_ms / the fastest of SDPA cuDNN / flash / efficient (goal for dispatch: <= 1)
  dispatch              (dispatch* only) {"choice": ..., "seconds": {candidate: s}} from ops.backends()
  cls_export_overhead   (fastmask_cls only) kernel_ms / fastmask kernel_ms - 1   (goal: <= 0.05)
  speedup_vs_explicit   (fastmask_cls only) explicit_cls kernel_ms / kernel_ms  (goal: >= 3)

The Triton interpreter's CPU timings mean nothing, so every kernel case skips without a GPU; one
CPU case times the explicit-softmax baseline at a small shape to keep the suite exercisable.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from common import HAS_CUDA, device_ms, need_gpu, timed
from fastmask import ops

MODELS = {"vit_s": 6, "vit_b": 12}
BATCHES = (64, 128, 256, 512)
SEQ_LEN, HEAD_DIM, DTYPE = 197, 64, torch.bfloat16
SDPA = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}
IMPLS = ("dispatch_cls", "dispatch", "fastmask_cls", "fastmask", *SDPA, *(f"{b}_cls" for b in SDPA), "xformers",
         "explicit_cls")
MODES = ("fwd", "fwd_bwd")

try:  # optional dependency
    import xformers.ops as xops
except Exception as exc:  # ImportError, or a broken build raising at import
    xops = None
    XFORMERS_MISSING = f"xformers is not importable here ({type(exc).__name__}: {exc})"


# ---------------------------------------------------------------------------------------------
# the implementations: each maps (q, k, v) [B, H, L, Dh] to out (and the CLS map where it has one)
# ---------------------------------------------------------------------------------------------

def run_fastmask_cls(q, k, v):
    return ops.attention(q, k, v, return_cls_attn=True, backend="triton")


def run_fastmask(q, k, v):
    return ops.attention(q, k, v, backend="triton")


def run_dispatch_cls(q, k, v):
    return ops.attention(q, k, v, return_cls_attn=True)


def run_dispatch(q, k, v):
    return ops.attention(q, k, v)


def _sdpa(backend, with_cls):
    def run(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            out = F.scaled_dot_product_attention(q, k, v)
        if not with_cls:
            return out
        from fastmask.kernels.cls_row import cls_row

        return out, cls_row(q.detach(), k.detach(), q.shape[-1] ** -0.5, 1)
    return run


def run_xformers(q, k, v):
    # xformers takes [B, L, H, Dh]; the transposes are views of timm's qkv layout.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def run_explicit_cls(q, k, v, num_prefix_tokens=1):
    # timm's non-fused path, plus the map read off the materialised probabilities.
    probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    cls_attn = probs[:, :, 0, num_prefix_tokens:].float().mean(dim=1)
    return probs @ v, cls_attn


RUNNERS = {
    "dispatch_cls": run_dispatch_cls,
    "dispatch": run_dispatch,
    "fastmask_cls": run_fastmask_cls,
    "fastmask": run_fastmask,
    **{name: _sdpa(backend, False) for name, backend in SDPA.items()},
    **{f"{name}_cls": _sdpa(backend, True) for name, backend in SDPA.items()},
    "xformers": run_xformers,
    "explicit_cls": run_explicit_cls,
}


def make_inputs(B, H, L, Dh, dtype, device, requires_grad):
    """q, k, v as the strided views of one [B, L, 3*H*Dh] projection (what timm passes on)."""
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, L, 3, H, Dh, generator=gen, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in qkv.unbind(0))
    return q, k, v


def make_call(impl, mode, q, k, v):
    run = RUNNERS[impl]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return run(q, k, v)
        return call
    grad_out = torch.randn(q.shape, device=q.device, dtype=q.dtype)

    def call():
        res = run(q, k, v)
        out = res[0] if isinstance(res, tuple) else res
        return torch.autograd.grad(out, (q, k, v), grad_out)
    return call


# ---------------------------------------------------------------------------------------------
# measurements, cached per (impl, mode, shape) so that ratios reuse the baselines' numbers
# ---------------------------------------------------------------------------------------------

def skip_reason(impl):
    if impl == "xformers" and xops is None:
        return XFORMERS_MISSING
    return None


@functools.cache
def kernel_ms(impl, mode, B, H):
    """Median ms, or None when the implementation cannot run here (e.g. an SDPA backend this GPU lacks)."""
    q, k, v = make_inputs(B, H, SEQ_LEN, HEAD_DIM, DTYPE, torch.device("cuda"), mode == "fwd_bwd")
    call = make_call(impl, mode, q, k, v)
    try:
        return device_ms(call)
    except RuntimeError:  # "No available kernel" from sdpa_kernel, and the like
        return None


def best_sdpa_ms(mode, B, H):
    times = [t for t in (kernel_ms(name, mode, B, H) for name in SDPA) if t is not None]
    return min(times) if times else None


def dispatch_record(q, k, v, return_cls_attn):
    """What measured dispatch decided for this call's key (candidate seconds and the choice)."""
    from fastmask import dispatch

    # the key ops.attention builds: its scale resolved to a float, the flags as bools
    key = dispatch.make_key("attention", q, k, v, float(q.shape[-1] ** -0.5), bool(return_cls_attn), 1,
                            grad=dispatch.needs_grad(q, k, v))
    for table in dispatch.report().values():
        if key in table:
            return table[key]
    return None


def peak_extra_mb(call):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del res
    return peak / 2**20


def attention_flops(B, H, L, Dh, mode):
    fwd = 4 * B * H * L * L * Dh  # QK^T and PV, 2 FLOPs per multiply-add
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)  # backward: 5 matmuls (one recomputes QK^T)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl, model, B, mode):
    need_gpu()
    reason = skip_reason(impl)
    if reason:
        pytest.skip(reason)
    H = MODELS[model]
    ms = kernel_ms(impl, mode, B, H)
    if ms is None:
        pytest.skip(f"{impl} cannot run at this shape on this GPU")
    q, k, v = make_inputs(B, H, SEQ_LEN, HEAD_DIM, DTYPE, torch.device("cuda"), mode == "fwd_bwd")
    call = make_call(impl, mode, q, k, v)
    call()
    info = benchmark.extra_info
    info.update(impl=impl, mode=mode, model=model, shape=dict(B=B, H=H, L=SEQ_LEN, Dh=HEAD_DIM, dtype=str(DTYPE)))
    info["peak_extra_mb"] = round(peak_extra_mb(call), 2)
    info["kernel_ms"] = round(ms, 5)
    info["tflops"] = round(attention_flops(B, H, SEQ_LEN, HEAD_DIM, mode) / (ms * 1e-3) / 1e12, 1)
    for name, ref in (("ratio_vs_sdpa_flash", kernel_ms("sdpa_flash", mode, B, H)),
                      ("ratio_vs_best_sdpa", best_sdpa_ms(mode, B, H))):
        if ref:
            info[name] = round(ms / ref, 4)
    with_cls = impl.endswith("_cls")
    if with_cls and impl != "explicit_cls":
        plain = kernel_ms(impl[: -len("_cls")], mode, B, H)
        if plain:
            info["cls_export_overhead"] = round(ms / plain - 1, 4)
        info["speedup_vs_explicit"] = round(kernel_ms("explicit_cls", mode, B, H) / ms, 3)
    if impl.startswith("dispatch"):
        info["dispatch"] = dispatch_record(q, k, v, with_cls)
    benchmark(timed(call))


def test_cls_map_memory_is_linear_in_length(benchmark):
    """Peak extra memory of getting the map, fastmask vs explicit, as L grows (ViT-B, B=64)."""
    need_gpu("memory measurements of the CUDA kernels")
    rows, peaks = {}, {}
    for L in (65, 197, 401, 785):
        q, k, v = make_inputs(64, 12, L, HEAD_DIM, DTYPE, torch.device("cuda"), False)
        for impl in ("fastmask_cls", "explicit_cls"):
            peaks[impl, L] = peak_extra_mb(make_call(impl, "fwd", q, k, v))
            rows[f"{impl}_L{L}_mb"] = round(peaks[impl, L], 2)
    benchmark.extra_info.update(rows)
    # Linear: 4x the tokens may cost at most 1.5x the memory per token (a [B, H, L, L] buffer would cost 4x);
    # the explicit path holds two such buffers, so it needs more from L = 197 on.
    assert peaks["fastmask_cls", 785] / 785 <= 1.5 * peaks["fastmask_cls", 197] / 197, rows
    assert all(peaks["fastmask_cls", L] < peaks["explicit_cls", L] for L in (197, 401, 785)), rows
    q, k, v = make_inputs(64, 12, 785, HEAD_DIM, DTYPE, torch.device("cuda"), False)
    benchmark(timed(make_call("fastmask_cls", "fwd", q, k, v)))


def test_explicit_cls_map_cpu_small(benchmark):
    """The explicit-softmax baseline on the CPU at a small ViT-S shape (runs anywhere)."""
    B, H, L, Dh = 4, 6, SEQ_LEN, HEAD_DIM
    q, k, v = make_inputs(B, H, L, Dh, torch.float32, torch.device("cpu"), False)
    call = make_call("explicit_cls", "fwd", q, k, v)
    benchmark.extra_info.update(
        impl="explicit_cls", mode="fwd", device="cpu", shape=dict(B=B, H=H, L=L, Dh=Dh, dtype="float32"),
        # What the explicit path must hold at once: scores and probabilities, [B, H, L, L] each.
        attn_matrix_mb=round(2 * B * H * L * L * 4 / 2**20, 2),
        cls_map_mb=round(B * (L - 1) * 4 / 2**20, 4),
    )
    out, cls_attn = benchmark(call)
    assert cls_attn.shape == (B, L - 1)


# ---------------------------------------------------------------------------------------------
# which sequence lengths hit which tile shapes (the lengths masked training feeds the attention)
# ---------------------------------------------------------------------------------------------

# 96 px local crops (37), MAE 75% / 50% / 25% kept of 196 patches + CLS (50, 99, 148), 128 px (65),
# 224 px (197), 256 px (257).
LENGTHS = (37, 50, 65, 99, 148, 197, 257)


def padded_work(L, block_m, block_n, tail):
    """Fraction of the score tiles' work spent on padding: query tiles of block_m, full key blocks of
    block_n, then the ragged key tail in tiles of ``tail`` keys."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    keys = (L // block_n) * block_n + cdiv(L % block_n, tail) * tail
    return 1 - L * L / (cdiv(L, block_m) * block_m * keys)


def test_tile_shapes_per_length(benchmark):
    """Per length: the padded fraction of every shipped bf16 forward config with the 16-key tail tiles
    against the same config without them (what the first kernel did), and on a GPU the config the
    autotuner picked.  Runs on the CPU too (the padding is counted, not timed)."""
    from fastmask.kernels import cls_attention as ca

    configs = ca._CONFIGS["fwd"][("mma16", 64)]
    rows = {}
    for L in LENGTHS:
        per_config = {f"{bm}x{bn}/w{w}s{st}": {"padding": round(padded_work(L, bm, bn, ca._TAIL), 4),
                                                "padding_without_tail_tiles": round(padded_work(L, bm, bn, bn), 4)}
                      for bm, bn, w, st in configs}
        row = {"configs": per_config,
               "best_padding": min(c["padding"] for c in per_config.values()),
               "first_kernel_128x128_padding": round(padded_work(L, 128, 128, 128), 4)}
        if HAS_CUDA:
            q, k, v = make_inputs(64, 6, L, HEAD_DIM, DTYPE, torch.device("cuda"), False)
            ops.attention(q, k, v, return_cls_attn=True, backend="triton")
            chosen = [cfg for key, cfg in ca._fwd.cache.items() if key[0] == L]
            if chosen:
                kw = chosen[0].kwargs
                row["autotuned"] = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}/w{chosen[0].num_warps}s{chosen[0].num_stages}"
                row["autotuned_padding"] = round(padded_work(L, kw["BLOCK_M"], kw["BLOCK_N"], ca._TAIL), 4)
        rows[str(L)] = row
    benchmark.extra_info["lengths"] = rows
    benchmark.extra_info["tail_tile"] = ca._TAIL
    assert rows["197"]["best_padding"] < rows["197"]["first_kernel_128x128_padding"]
    benchmark(lambda: padded_work(197, 64, 64, ca._TAIL))
