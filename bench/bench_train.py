"""End-to-end training throughput: iBOT + AttMask-High, fastmask against plain PyTorch.

Both sides train the same method on the same model size, batch and crops:

* ``fastmask``: ``fastmask.methods.ibot`` (MaskedViT with ``fastmask.ops.attention`` returning the
  teacher's CLS map from its own forward, ``ops.cls_attention_mask`` masks, ``apply_mask_token``),
  the driver's optimizer choice (apex FusedAdam / fused AdamW on CUDA) and, with ``loader``, the
  fastmask loader (DALI when importable).
* ``plain``: the way reference code does it: timm ``VisionTransformer`` whose last block computes
  attention explicitly (``softmax(q k^T)`` materialised) to read the CLS map, masks by ``argsort`` +
  ``scatter_`` with the ratio per sample drawn on the host, ``torch.where`` for the mask token,
  ``torch.optim.AdamW`` and, with ``loader``, the torchvision pipeline (``loader=torch``).
  Heads and loss are shared (plain PyTorch in both).

Cases: ``cpu_tiny`` (always; a 2-block ViT on 32 px crops) and ``gpu_vits16`` (ViT-S/16 at 224 px,
2 global + 4 local 96 px crops, bf16 autocast; only with CUDA: goal ≥ 1.5× images/s).  Each test
times both sides itself (device-synchronised) and records images/s and the ratio in
``benchmark.extra_info``; pytest-benchmark times the fastmask step.

    .venv/bin/python -m pytest bench/bench_train.py --benchmark-json bench/results/train-$(hostname).json
"""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from common import HAS_CUDA, sync

from fastmask.config import load_config
from fastmask.methods import get_method
from fastmask.methods.base import StepState, ema_update_
from fastmask.methods.losses import IBOTLoss
from fastmask.models import IBOTHead

CASES = {
    "cpu_tiny": dict(recipe="ibot_tiny_builtin", batch=16, global_size=32, local_size=16, n_local=2,
                     overrides=["model.depth=2", "method.out_dim=256", "method.patch_out_dim=256"]),
    "gpu_vits16": dict(recipe="ibot_vits16_attmask_high", batch=64, global_size=224, local_size=96, n_local=4,
                       overrides=["data.data=builtin:shapes", "data.num_local_crops=4"]),
}


# ------------------------------------------------------------------------------------- plain PyTorch iBOT

class PlainViT(nn.Module):
    """timm VisionTransformer; the last block's attention is recomputed explicitly for the CLS map."""

    def __init__(self, cfg, drop_path_rate):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from fastmask.models import VIT_CONFIGS

        m = cfg.model
        arch = dict(VIT_CONFIGS[m.arch])
        for k in ("depth", "embed_dim", "num_heads"):
            if getattr(m, k):
                arch[k] = getattr(m, k)
        self.vit = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, num_classes=0,
                                     drop_path_rate=drop_path_rate, dynamic_img_size=True, **arch)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.vit.embed_dim))
        self.embed_dim = self.vit.embed_dim

    def forward(self, x, mask=None, return_map=False):
        v = self.vit
        t = v.patch_embed(x)  # NHWC (dynamic_img_size)
        B, H, W, D = t.shape
        t = t.reshape(B, H * W, D)
        if mask is not None:
            t = torch.where(mask[..., None], self.mask_token.to(t.dtype), t)
        t = v._pos_embed(t.reshape(B, H, W, D))
        t = v.norm_pre(t)
        for blk in v.blocks[:-1]:
            t = blk(t)
        last = v.blocks[-1]
        cls_map = None
        if return_map:
            # reference AttMask code: the full [B, heads, L, L] attention of the last block
            a = last.attn
            y = last.norm1(t)
            qkv = a.qkv(y).reshape(B, y.shape[1], 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            q, k = a.q_norm(q), a.k_norm(k)
            attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            cls_map = attn[:, :, 0, 1:].mean(dim=1).float()
        t = v.norm(last(t))
        return t[:, 0], t[:, 1:], cls_map


def plain_attmask_high(cls_attn, ratio_range, mask_prob):
    """argsort + scatter_, per-sample ratios drawn on the host (reference AttMask)."""
    B, N = cls_attn.shape
    order = torch.argsort(cls_attn, dim=1, descending=True)
    ratios = torch.empty(B).uniform_(*ratio_range)
    counts = (ratios * N).long().to(cls_attn.device)
    gate = (torch.rand(B) < mask_prob).to(cls_attn.device)
    keep_rank = torch.arange(N, device=cls_attn.device)[None, :] < (counts * gate)[:, None]
    return torch.zeros(B, N, dtype=torch.bool, device=cls_attn.device).scatter_(1, order, keep_rank)


class PlainIBOT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.method

        def head(dim):
            return IBOTHead(dim, m.out_dim, m.patch_out_dim, shared_head=m.shared_head,
                            norm_last_layer=m.norm_last_layer, nlayers=m.head_nlayers,
                            hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim)

        self.student = PlainViT(cfg, cfg.model.drop_path_rate)
        self.teacher = PlainViT(cfg, 0.0)
        self.s_head, self.t_head = head(self.student.embed_dim), head(self.student.embed_dim)
        self.teacher.load_state_dict(self.student.state_dict())
        self.t_head.load_state_dict(self.s_head.state_dict())
        for p in list(self.teacher.parameters()) + list(self.t_head.parameters()):
            p.requires_grad_(False)
        self.loss_fn = IBOTLoss(m.out_dim, m.patch_out_dim)
        self.m = m

    def training_step(self, crops):
        g = torch.cat(crops[:2])
        with torch.no_grad():
            t_cls, t_patch, t_map = self.teacher(g, return_map=True)
            t_cls_out, t_patch_out = self.t_head(t_cls, t_patch)
        mask = plain_attmask_high(t_map, self.m.mask_ratio, self.m.mask_prob)
        s_cls, s_patch, _ = self.student(g, mask=mask)
        s_cls_out, s_patch_out = self.s_head(s_cls, s_patch)
        if len(crops) > 2:
            l_cls, _, _ = self.student(torch.cat(crops[2:]))
            s_cls_out = torch.cat([s_cls_out, self.s_head(l_cls)[0]])
        loss, _ = self.loss_fn(s_cls_out, s_patch_out, t_cls_out, t_patch_out, mask, 0.04, 0.04)
        return loss

    @torch.no_grad()
    def ema(self, momentum):
        ema_update_(self.teacher, self.student, momentum)
        ema_update_(self.t_head, self.s_head, momentum)


# ------------------------------------------------------------------------------------- runners

def _crops(case, device, gen):
    b = case["batch"]
    return ([torch.randn(b, 3, case["global_size"], case["global_size"], generator=gen).to(device) for _ in range(2)]
            + [torch.randn(b, 3, case["local_size"], case["local_size"], generator=gen).to(device)
               for _ in range(case["n_local"])])


def _fastmask_runner(cfg, device, amp_dtype):
    from fastmask import ops
    from fastmask.engine.loop import make_optimizer as _make_optimizer

    method = get_method("ibot")(cfg, 10).to(device)
    opt = _make_optimizer(method.param_groups(0.04), 1e-4, (0.9, 0.999), device)
    gen = torch.Generator(device=device).manual_seed(0)
    ops.set_value_checks(False)
    state = StepState(epoch=1, step=0, steps_per_epoch=1, total_steps=1, progress=0.0, lr=1e-4, wd=0.04,
                      teacher_momentum=0.996, backward=lambda loss: loss.backward(), device=device,
                      generator=gen, amp_dtype=amp_dtype)

    def step(crops):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _ = method.training_step((crops, None), state)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_after_optimizer_step(state)
        return loss

    return step


def _plain_runner(cfg, device, amp_dtype):
    model = PlainIBOT(cfg).to(device)
    params = [p for p in list(model.student.parameters()) + list(model.s_head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)

    def step(crops):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model.training_step(crops)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.ema(0.996)
        return loss

    return step


def _images_per_s(step, batches, warmup=2):
    for crops in batches[:warmup]:
        step(crops)
    sync()
    t0 = time.perf_counter()
    for crops in batches[warmup:]:
        step(crops)
    sync()
    return len(batches[warmup:]) * batches[0][0].shape[0] / (time.perf_counter() - t0)


@pytest.mark.parametrize("case_name", list(CASES))
def test_ibot_attmask_train_throughput(benchmark, case_name):
    case = CASES[case_name]
    if case_name.startswith("gpu") and not HAS_CUDA:
        pytest.skip("ViT-S/16 iBOT+AttMask training throughput needs a CUDA device")
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    cfg = load_config(config=case["recipe"], overrides=case["overrides"] + ["method.mask=attmask_high"])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = 6 if device.type == "cpu" else 20
    batches = [_crops(case, device, gen) for _ in range(n)]
    fm_step = _fastmask_runner(cfg, device, amp_dtype)
    plain_step = _plain_runner(cfg, device, amp_dtype)
    fm_ips = _images_per_s(fm_step, batches)
    plain_ips = _images_per_s(plain_step, batches)
    it = iter(batches * 100)
    benchmark.pedantic(lambda: (fm_step(next(it)), sync()), rounds=3 if device.type == "cpu" else 10,
                       warmup_rounds=1)
    benchmark.extra_info.update({
        "case": case_name, "batch": case["batch"], "crops": 2 + case["n_local"],
        "images_per_s_fastmask": fm_ips, "images_per_s_plain": plain_ips, "speedup": fm_ips / plain_ips,
        "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        "goal": ">= 1.5x on an H200 for gpu_vits16",
    })
    assert math.isfinite(fm_ips) and math.isfinite(plain_ips)


@pytest.mark.parametrize("loader", ["fastmask", "torchvision"])
def test_ibot_end_to_end_with_loader(benchmark, loader):
    """Images/s of whole training steps fed by the loader (fastmask: DALI when importable)."""
    from fastmask.data import make_loader

    case = CASES["gpu_vits16" if HAS_CUDA else "cpu_tiny"]
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    cfg = load_config(config=case["recipe"], overrides=case["overrides"] + [
        "method.mask=attmask_high", f"data.batch_size={case['batch']}", f"data.num_local_crops={case['n_local']}",
        f"data.local_size={case['local_size']}", f"data.loader={'auto' if loader == 'fastmask' else 'torch'}"])
    data = make_loader(cfg.data, "train", "multicrop", device=device)
    step = _fastmask_runner(cfg, device, amp_dtype) if loader == "fastmask" else _plain_runner(cfg, device, amp_dtype)
    max_steps = 4 if device.type == "cpu" else 30

    def epoch_slice():
        n = 0
        data.set_epoch(0)
        for crops, _ in data:
            step([c.to(device, non_blocking=True) for c in crops])
            n += crops[0].shape[0]
            if n >= max_steps * case["batch"]:
                break
        sync()
        return n

    epoch_slice()  # warm-up (workers, DALI pipeline build)
    t0 = time.perf_counter()
    n = epoch_slice()
    ips = n / (time.perf_counter() - t0)
    benchmark.pedantic(epoch_slice, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update({"loader": loader, "backend": getattr(data, "backend", "?"), "images_per_s": ips})
