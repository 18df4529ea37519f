"""End-to-end forward+backward throughput of ViTs with 0/50/75% of the patch tokens dropped.

Compares ``fastmask.models.MaskedViT`` (``forward(x, ids_keep=...)``: fused gather + positional
embedding, fastmask attention) with the plain timm ``VisionTransformer`` holding the same weights, on
which the tokens are dropped the way one would without fastmask (``torch.gather`` after timm's
``_pos_embed``; SDPA attention).  Each case records beside its timing (``benchmark.extra_info``):
images/s, the forward+backward FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` and their
ratio to the full-token model, the speed-up over the 0%-drop run of the same implementation, and for
fastmask the ratio to timm at the same drop ratio.

GPU: ViT-S/16 (batch 128) and ViT-B/16 (batch 64) at 224 px under bf16 autocast.  CPU: a tiny batch
(2) of ViT-Tiny/S at 64 px so the suite finishes in a minute or two; CPU numbers only show the FLOP
savings, not GPU speed.

    .venv/bin/python -m pytest bench/bench_models.py --benchmark-json bench/results/models-$(hostname).json
"""
import contextlib
import copy
import functools
import os

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import DEVICE, HAS_CUDA, sync
from fastmask import ops
from fastmask.models import convert_timm_vit

if HAS_CUDA:
    CASES = [("vit_small", 224, 16, 128), ("vit_base", 224, 16, 64)]  # name, img, patch, batch
    ROUNDS, WARMUP = 20, 3
else:
    CASES = [("vit_tiny", 64, 16, 2), ("vit_small", 64, 16, 2)]
    ROUNDS, WARMUP = 20, 3
DROP_RATIOS = (0.0, 0.5, 0.75)
IMPLS = ("timm", "fastmask")  # timm first so fastmask's ratio to it can be recorded

# images/s of finished cases, keyed by (name, drop, impl): the ratios between cases come from here.
_THROUGHPUT = {}
# forward+backward FLOPs of the full-token model, keyed by (name, impl).
_FULL_FLOPS = {}


@functools.lru_cache(maxsize=None)
def _models(name: str, img: int, patch: int):
    torch.manual_seed(0)
    ref = timm.create_model(f"{name}_patch{patch}_224", pretrained=False, img_size=img, num_classes=1000)
    ref = ref.to(DEVICE).train()
    ours = convert_timm_vit(copy.deepcopy(ref))
    return ref, ours


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA else contextlib.nullcontext()


def _step_fn(impl, model, x, ids_keep):
    if impl == "fastmask":
        def forward():
            return model(x, ids_keep=ids_keep)
    elif ids_keep is None:
        def forward():
            return model(x)
    else:
        def forward():
            # Token drop without fastmask: timm's embedding, then torch.gather on the patch tokens.
            seq = model._pos_embed(model.patch_embed(x))
            P = model.num_prefix_tokens
            idx = ids_keep.unsqueeze(-1).expand(-1, -1, seq.shape[-1])
            seq = torch.cat([seq[:, :P], torch.gather(seq[:, P:], 1, idx)], dim=1)
            return model.forward_head(model.norm(model.blocks(seq)))

    def step():
        model.zero_grad(set_to_none=True)
        # Production setting: no host-synchronising index checks inside the timed loop.
        with ops.value_checks(False), _autocast():
            logits = forward()
        logits.float().logsumexp(-1).mean().backward()

    return step


def _count_flops(step) -> int:
    # fastmask's Triton attention is an opaque kernel to the counter: count with the torch reference
    # backend, which performs the same matmuls.
    old = os.environ.get("FASTMASK_BACKEND")
    os.environ["FASTMASK_BACKEND"] = "torch"
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        if old is None:
            os.environ.pop("FASTMASK_BACKEND", None)
        else:
            os.environ["FASTMASK_BACKEND"] = old
    sync()
    return counter.get_total_flops()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("drop", DROP_RATIOS, ids=lambda r: f"drop{int(r * 100)}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}px-b{c[3]}")
def test_vit_forward_backward(benchmark, case, drop, impl):
    name, img, patch, batch = case
    ref, ours = _models(name, img, patch)
    model = ours if impl == "fastmask" else ref
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=g).to(DEVICE)
    N = (img // patch) ** 2
    keep = int(N * (1 - drop))
    ids_keep = None
    if drop > 0:
        ids_keep = torch.rand(batch, N, generator=g).argsort(dim=1)[:, :keep].sort(dim=1).values.to(DEVICE)

    step = _step_fn(impl, model, x, ids_keep)
    flops = _count_flops(step)
    if drop == 0:
        _FULL_FLOPS[(name, impl)] = flops
    elif (name, impl) not in _FULL_FLOPS:
        _FULL_FLOPS[(name, impl)] = _count_flops(_step_fn(impl, model, x, None))
    full_flops = _FULL_FLOPS[(name, impl)]

    benchmark.pedantic(step, setup=sync, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    sync()
    images_per_s = batch / benchmark.stats.stats.median  # the median: robust to a busy CPU
    _THROUGHPUT[(name, drop, impl)] = images_per_s
    info = dict(
        model=f"{name}_patch{patch}_{img}",
        impl=impl,
        device=str(DEVICE) + (f" ({torch.cuda.get_device_name()})" if HAS_CUDA else ""),
        dtype="bf16 autocast" if HAS_CUDA else "float32",
        batch=batch,
        drop_ratio=drop,
        tokens_kept=keep,
        tokens_total=N,
        images_per_s=round(images_per_s, 2),
        gflops_fwd_bwd=round(flops / 1e9, 3),
        flops_ratio_vs_full=round(flops / full_flops, 4),
    )
    base = _THROUGHPUT.get((name, 0.0, impl))
    if base is not None:
        info["speedup_vs_no_drop"] = round(images_per_s / base, 3)
    if impl == "fastmask" and (name, drop, "timm") in _THROUGHPUT:
        info["speedup_vs_timm"] = round(images_per_s / _THROUGHPUT[(name, drop, "timm")], 3)
    benchmark.extra_info.update(info)
