"""Training throughput by compile mode: eager vs ``compile=blocks`` vs ``compile=step``, side by side.

For iBOT + AttMask-High and MaskedKD, each test builds the method three times from one seed and
times the driver's step function (``fastmask.engine.compile.compile_step``: forward, loss and
backward; the optimizer step is the same in every mode and left out) in each mode, after warm-up
calls that include the compilation.  Inductor generates the code (C++ on a CPU, Triton on a GPU).
``benchmark.extra_info`` records, per mode, images/s, the ratio to eager, the compile time, and
the graph breaks of one step (``torch._dynamo.explain`` of the whole step: what ``compile=step``
would break on) with the number of compiled graphs one step runs through; pytest-benchmark times
the ``step`` mode.

Cases: ``cpu_tiny`` (depth 2, width 64, 32 px images with 8 px patches, batch 16: on a CPU only the
ratios mean something) and ``gpu_vits16`` (ViT-S/16 at 224 px, bf16 autocast; CUDA only).

    .venv/bin/python -m pytest bench/bench_compile.py --benchmark-json bench/results/compile-cpu.json
"""
from __future__ import annotations

import contextlib
import statistics
import time

import pytest
import torch

from common import HAS_CUDA, sync

from fastmask.engine.compile import compile_step, count_graph_breaks, train_step_fn
from tiny_methods import NO_MIX, make_state

TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
        "data.image_size=32", "data.local_size=16"]
CASES = {
    "cpu_tiny": dict(batch=16, rounds=3, methods={
        "ibot_attmask_high": ("ibot_tiny_builtin", TINY + [
            "method.out_dim=256", "method.patch_out_dim=256", "method.head_hidden_dim=128",
            "method.head_bottleneck_dim=64", "method.mask=attmask_high"]),
        "maskedkd": ("maskedkd_tiny_builtin", TINY + NO_MIX + [
            "method.teacher.depth=2", "method.teacher.embed_dim=96", "method.teacher.num_heads=2"]),
    }),
    "gpu_vits16": dict(batch=64, rounds=20, methods={
        "ibot_attmask_high": ("ibot_vits16_attmask_high", ["data.data=builtin:shapes", "data.num_local_crops=4"]),
        "maskedkd": ("maskedkd_deits_deitb", ["data.data=builtin:shapes"] + NO_MIX),
    }),
}
MODES = ("none", "blocks", "step")


def _build(recipe, overrides, device):
    from fastmask.config import load_config
    from fastmask.methods import get_method

    cfg = load_config(config=recipe, overrides=overrides)
    torch.manual_seed(0)
    return get_method(cfg.method_name)(cfg, 10).to(device).train()


def _batch(method, batch, device, global_size, local_size, n_local):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    if method.pipeline == "multicrop":
        crops = [torch.randn(batch, 3, global_size, global_size, generator=g) for _ in range(2)]
        crops += [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(n_local)]
        return [c.to(device) for c in crops], labels
    return torch.randn(batch, 3, global_size, global_size, generator=g).to(device), labels


def _compiled_graphs_per_step(method, mode) -> int:
    if mode == "none":
        return 0
    if mode == "step":
        return 1
    return sum(1 for m in method.modules() if getattr(m, "_compiled_call_impl", None) is not None)


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("method_name", ["ibot_attmask_high", "maskedkd"])
def test_compile_modes_throughput(benchmark, case_name, method_name):
    case = CASES[case_name]
    gpu = case_name.startswith("gpu")
    if gpu and not HAS_CUDA:
        pytest.skip("the ViT-S/16 case needs a CUDA device")
    if not gpu and HAS_CUDA:
        pytest.skip("the tiny case is the CPU one")
    device = torch.device("cuda" if gpu else "cpu")
    recipe, overrides = case["methods"][method_name]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    sizes = (224, 96, 4) if gpu else (32, 16, 2)

    results, steps = {}, {}
    for mode in MODES:
        method = _build(recipe, overrides, device)
        batch = _batch(method, case["batch"], device, *sizes)
        if mode == "none":
            breaks = count_graph_breaks(train_step_fn(method), method.prepare_batch(batch, make_state(device=device)),
                                        make_state(device=device))
            method = _build(recipe, overrides, device)  # explain ran a step: start again from the seed
        step = compile_step(method, mode)

        def run(i=0, step=step, method=method, batch=batch):
            with amp:
                loss, _ = step(batch, make_state(step=i, device=device))
            for p in method.parameters():
                p.grad = None
            return loss

        t0 = time.perf_counter()
        for i in range(2):  # compiles (and, for blocks, reaches every block's shape)
            run(i)
        sync()
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(case["rounds"]):
            t = time.perf_counter()
            run(i)
            sync()
            times.append(time.perf_counter() - t)
        seconds = statistics.median(times)
        results[mode] = dict(images_per_s=case["batch"] / seconds, step_ms=seconds * 1e3,
                             compile_and_warmup_s=compile_s,
                             compiled_graphs_per_step=_compiled_graphs_per_step(method, mode))
        steps[mode] = run
    for mode in MODES:
        results[mode]["ratio_to_eager"] = results[mode]["images_per_s"] / results["none"]["images_per_s"]

    benchmark.pedantic(lambda: (steps["step"](), sync()), rounds=3 if not gpu else 10, iterations=1)
    benchmark.extra_info.update({
        "method": method_name, "case": case_name, "device": str(device), "batch": case["batch"],
        "graph_breaks_per_step": breaks.breaks, "graph_break_reasons": breaks.reasons,
        **{f"{mode}_{k}": round(v, 4) if isinstance(v, float) else v
           for mode, r in results.items() for k, v in r.items()},
    })
    print(f"\n{case_name} {method_name}: graph breaks per step {breaks.breaks}; " + ", ".join(
        f"{m} {r['images_per_s']:.1f} img/s ({r['ratio_to_eager']:.2f}x)" for m, r in results.items()))
