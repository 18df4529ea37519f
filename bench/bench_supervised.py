"""Training-step time of the supervised methods: MaskedKD against plain KD, MaskSub against the plain
recipe and against a mask-token sub-branch.

Each case times one full training step (mixing, forwards, backward(s), AdamW step) with
pytest-benchmark and records beside it (``benchmark.extra_info``):

* MaskedKD at teacher keep 196 (= plain KD: the teacher sees every token), 147, 98 and 49 of the 196
  patches: the teacher FLOPs the method itself logged (counted by its hook meter) and their ratio
  to the full teacher, the FLOPs of the whole step (``FlopCounterMode``, forward + backward) and
  their ratio to plain KD, and the step-time ratio to plain KD.  ``teacher_forward`` cases time the
  teacher's forward alone at each keep (the part MaskedKD makes cheaper).
* MaskSub: ``plain`` (the main branch alone: the recipe without MaskSub), ``masksub`` (sub-branch
  on 50% of the tokens, dropped), ``masktoken`` (sub-branch on all tokens with the hidden half
  replaced by the mask token), ``dropsub``, ``pathsub`` and ``masksub_joint`` (both graphs alive,
  one backward): step FLOPs and time relative to ``plain`` and to ``masktoken``, and the peak bytes
  of saved activations (plus the CUDA allocator's peak on a GPU).

GPU: DeiT-S student / ViT-B teacher and ViT-S MaskSub at 224/16, batch 128, bf16 autocast.  CPU: a
ViT-Tiny student (2 blocks) / ViT-S teacher (4 blocks) and a 2-block ViT-Tiny MaskSub at 224/16
(196 patches, as in the papers), batch 4, so the suite runs in a few minutes; on the CPU the ratios
use the process's CPU time on one thread (shared cores make wall clock noise) and show the FLOP
savings, not GPU speed.  FLOPs are counted with the attention on the PyTorch reference
(FlopCounterMode cannot see fused kernels).

    .venv/bin/python -m pytest bench/bench_supervised.py --benchmark-json bench/results/supervised-$(hostname).json
"""
import contextlib
import os
import time
import warnings

import pytest
import torch

from common import DEVICE, HAS_CUDA, sync
from fastmask.config import ModelConfig, TrainConfig
from fastmask.flops import SavedActivationMeter, count_flops
from fastmask.methods.base import StepState
from fastmask.methods.maskedkd import MaskedKD, MaskedKDConfig
from fastmask.methods.masksub import MaskSub, MaskSubConfig
from fastmask.methods.supervised import classification_loss
from fastmask.models import create_vit

NUM_CLASSES = 1000
IMG, PATCH = 224, 16
if HAS_CUDA:
    KD_STUDENT = dict(name="vit_small", depth=12)
    KD_TEACHER = dict(name="vit_base", depth=12)
    SUB_MODEL = dict(name="vit_small", depth=12)
    BATCH, ROUNDS, WARMUP = 128, 10, 3
else:
    KD_STUDENT = dict(name="vit_tiny", depth=2)
    KD_TEACHER = dict(name="vit_small", depth=4)
    SUB_MODEL = dict(name="vit_tiny", depth=2)
    BATCH, ROUNDS, WARMUP = 4, 5, 1
AMP_DTYPE = torch.bfloat16 if HAS_CUDA else None
KEEPS = (196, 147, 98, 49)  # 196 first: plain KD, the reference of the others
SUB_VARIANTS = ("plain", "masktoken", "masksub", "dropsub", "pathsub", "masksub_joint")

# median step seconds and step FLOPs of finished cases: the ratios between cases come from here
_RESULTS = {}


@contextlib.contextmanager
def _torch_attention():
    """Run fastmask ops on the PyTorch reference (so FlopCounterMode sees the attention matmuls)."""
    old = os.environ.get("FASTMASK_BACKEND")
    os.environ["FASTMASK_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTMASK_BACKEND"]
        else:
            os.environ["FASTMASK_BACKEND"] = old


def _cfg(method_cfg, model):
    cfg = TrainConfig(model=ModelConfig(arch=model["name"], patch_size=PATCH, img_size=IMG, drop_path_rate=0.0,
                                        depth=model["depth"]))
    cfg.method = method_cfg
    return cfg


def _vit(model, drop_path_rate=0.0):
    return create_vit(model["name"], patch_size=PATCH, img_size=IMG, num_classes=NUM_CLASSES, depth=model["depth"],
                      drop_path_rate=drop_path_rate).to(DEVICE)


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, IMG, IMG, generator=g).to(DEVICE)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g).to(DEVICE)
    return images, labels


def _state(step=0):
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(step)
    return StepState(epoch=0, step=step, steps_per_epoch=1, total_steps=1, progress=0.0, lr=1e-4, wd=0.05,
                     teacher_momentum=0.0, backward=lambda loss: loss.backward(), device=DEVICE, generator=gen,
                     amp_dtype=AMP_DTYPE)


def _autocast():
    return torch.autocast(DEVICE.type, dtype=AMP_DTYPE) if AMP_DTYPE is not None else contextlib.nullcontext()


def _make_step(method, params, manual_backward):
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = _batch()
    last = {}

    def step():
        with _autocast():
            loss, metrics = method.training_step(batch, _state())
        if not manual_backward:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["metrics"] = metrics

    return step, last


def _time(benchmark, step):
    """Median seconds of ``step``: wall clock on a GPU; on the CPU the process's CPU time on one
    thread, because this machine's cores are shared and wall-clock ratios there are mostly noise
    (pytest-benchmark's own wall-clock stats are kept in the JSON either way)."""
    cpu_times = []

    def timed_step():
        start = time.process_time()
        step()
        sync()
        cpu_times.append(time.process_time() - start)

    threads = torch.get_num_threads()
    if not HAS_CUDA:
        torch.set_num_threads(1)
    try:
        benchmark.pedantic(timed_step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    finally:
        torch.set_num_threads(threads)
    if HAS_CUDA:
        benchmark.extra_info["time_basis"] = "wall clock (median)"
        return benchmark.stats.stats.median
    measured = sorted(cpu_times[WARMUP:])
    median = measured[len(measured) // 2]
    benchmark.extra_info["time_basis"] = "process CPU time, 1 thread (median)"
    benchmark.extra_info["cpu_seconds_median"] = round(median, 4)
    return median


def _step_flops(step):
    with _torch_attention():
        _, flops = count_flops(step)
    return flops


# ------------------------------------------------------------------------------------------------
# MaskedKD
# ------------------------------------------------------------------------------------------------

def _maskedkd(keep):
    torch.manual_seed(0)
    mcfg = MaskedKDConfig(teacher_keep=keep, loss="ce", label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = MaskedKD(_cfg(mcfg, KD_STUDENT), NUM_CLASSES, student=_vit(KD_STUDENT), teacher=_vit(KD_TEACHER))
    return method.to(DEVICE).train()


@pytest.mark.parametrize("keep", KEEPS)
def test_maskedkd_step(benchmark, keep):
    method = _maskedkd(keep)
    step, last = _make_step(method, list(method.student.parameters()), manual_backward=False)
    flops = _step_flops(step)
    seconds = _time(benchmark, step)
    _RESULTS[("kd", keep)] = (seconds, flops)
    m = last["metrics"]
    info = {
        "case": "plain_kd" if keep == 196 else f"maskedkd_keep{keep}",
        "student": KD_STUDENT, "teacher": KD_TEACHER, "batch": BATCH, "img": IMG, "patch": PATCH,
        "teacher_keep": keep,
        "teacher_gflops": round(m["teacher_gflops"], 3),
        "teacher_gflops_full": round(m["teacher_gflops_full"], 3),
        "teacher_flops_ratio": round(m["teacher_flops_ratio"], 4),
        "step_gflops": round(flops / 1e9, 3),
        "images_per_s": round(BATCH / seconds, 2),
    }
    plain = _RESULTS.get(("kd", 196))
    if plain is not None:
        info["step_time_ratio_vs_plain_kd"] = round(seconds / plain[0], 4)
        info["step_flops_ratio_vs_plain_kd"] = round(flops / plain[1], 4)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("keep", KEEPS)
def test_teacher_forward(benchmark, keep):
    torch.manual_seed(0)
    teacher = _vit(KD_TEACHER).eval()
    images, _ = _batch()
    scores = torch.rand(BATCH, 196, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ids = None if keep == 196 else torch.sort(torch.topk(scores, keep, dim=1).indices, dim=1).values

    def forward():
        with torch.no_grad(), _autocast():
            teacher(images, ids_keep=ids)

    with _torch_attention():
        _, flops = count_flops(forward)
    seconds = _time(benchmark, forward)
    _RESULTS[("teacher", keep)] = (seconds, flops)
    full = _RESULTS.get(("teacher", 196))
    info = {"teacher": KD_TEACHER, "batch": BATCH, "teacher_keep": keep, "gflops": round(flops / 1e9, 3)}
    if full is not None:
        info["time_ratio_vs_full"] = round(seconds / full[0], 4)
        info["flops_ratio_vs_full"] = round(flops / full[1], 4)
    benchmark.extra_info.update(info)


# ------------------------------------------------------------------------------------------------
# MaskSub
# ------------------------------------------------------------------------------------------------

def _masksub(variant):
    torch.manual_seed(0)
    kw = dict(loss="bce", label_smoothing=0.0, mixup_alpha=0.8, cutmix_alpha=1.0)
    if variant == "masksub_joint":
        mcfg = MaskSubConfig(variant="masksub", sequential_backward=False, **kw)
    else:
        mcfg = MaskSubConfig(variant="masksub" if variant == "plain" else variant, **kw)
    method = MaskSub(_cfg(mcfg, SUB_MODEL), NUM_CLASSES, student=_vit(SUB_MODEL))
    return method.to(DEVICE).train()


def _plain_step(method):
    """The recipe without MaskSub: one forward on the full images, one backward."""
    opt = torch.optim.AdamW(method.student.parameters(), lr=1e-4)
    images, labels = _batch()

    def step():
        state = _state()
        x, targets = method.mixer(images, labels, state.generator)
        with _autocast():
            logits = method.student(x)
        classification_loss(logits, targets, method.mcfg.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _peak_memory(step, params):
    """(peak saved-activation bytes, CUDA allocator peak bytes or None) of one step."""
    meter = SavedActivationMeter(exclude=params)
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with meter.track():
        step()
    cuda_peak = None
    if HAS_CUDA:
        torch.cuda.synchronize()
        cuda_peak = torch.cuda.max_memory_allocated()
    return meter.peak, cuda_peak


@pytest.mark.parametrize("variant", SUB_VARIANTS)
def test_masksub_step(benchmark, variant):
    method = _masksub(variant)
    params = list(method.student.parameters())
    step = _plain_step(method) if variant == "plain" else _make_step(method, params, manual_backward=True)[0]
    flops = _step_flops(step)
    saved_peak, cuda_peak = _peak_memory(step, params)
    seconds = _time(benchmark, step)
    _RESULTS[("sub", variant)] = (seconds, flops)
    info = {
        "case": variant, "model": SUB_MODEL, "batch": BATCH, "img": IMG, "patch": PATCH,
        "step_gflops": round(flops / 1e9, 3),
        "images_per_s": round(BATCH / seconds, 2),
        "peak_saved_activation_mb": round(saved_peak / 2**20, 2),
    }
    if cuda_peak is not None:
        info["cuda_peak_allocated_mb"] = round(cuda_peak / 2**20, 1)
    for ref in ("plain", "masktoken"):
        other = _RESULTS.get(("sub", ref))
        if other is not None and ref != variant:
            info[f"step_time_ratio_vs_{ref}"] = round(seconds / other[0], 4)
            info[f"step_flops_ratio_vs_{ref}"] = round(flops / other[1], 4)
    benchmark.extra_info.update(info)
