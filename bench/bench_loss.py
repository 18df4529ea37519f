"""Compute only what the loss reads (issue 20): counted FLOPs and bytes saved for backward, before/after.

Exact counts on the CPU (no timing):

* ``ibot_step``: one iBOT + AttMask-High training step of ViT-S/16 at 224 px with 2 global and 10
  local (96 px) crops per image, forward + backward: FLOPs (``FlopCounterMode``) and bytes saved for
  backward (``saved_tensors_hooks``; storages counted once, parameters excluded), ``before`` = the
  official path (student patch head on every token, softmax/log_softmax loss) and ``after`` = the
  default path (head on the masked tokens only, ``fastmask.ops.sdist_loss``); ``after_fuse_last_layer``
  also fuses the head's last layer into the loss.  The student's patch
  head is also counted alone, on the tokens each path gives it; it is linear in its tokens, so the
  figure at the default masking (r ~ U(0.1, 0.5), p = 0.5: 15% of the tokens hidden on average) is
  the per-token count times the expected number of masked tokens.
* ``loss_memory``: the DINO/iBOT CLS loss at K = 65536, 12 crops (2 global), B = 64: bytes autograd
  holds for backward between forward and backward, for today's formula, the op on fp32 and bf16
  logits, and the op fused with the last layer (bottleneck 256).  Besides what is saved, a loss's
  peak adds the logits' gradient in backward (the same ``[rows, K]`` in the logits' dtype on every
  path except the fused-linear one, which has none) and its forward temporaries (today's path: a
  float32 ``[rows, K]`` for ``s / ts`` and one ``[B, K]`` product per pair; the op: slices of at most
  16 MiB on the torch backend, ``[nb, rows]`` partials on Triton).

    python bench/bench_loss.py                    # writes bench/results/loss-cpu.json
    python -m pytest bench/bench_loss.py -q       # the same counts, asserting the issue's goals

On a GPU the same file would also time the step and search the largest batch that fits (not done
here: no GPU was available; ``step time`` and ``max batch`` need ``torch.cuda.max_memory_allocated``
around the step at growing B).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Dict, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fastmask.config import load_config  # noqa: E402
from fastmask.methods import get_method  # noqa: E402
from fastmask.methods.base import StepState  # noqa: E402
from fastmask.methods.losses import DINOLoss, gather_rows, masked_token_ids  # noqa: E402

EXPECTED_MASKED_FRACTION = 0.5 * 0.3  # mask_prob * E[r], r ~ U(0.1, 0.5)


class SavedBytes:
    """Bytes autograd saved for backward, each storage once, parameters and ``exclude`` left out."""

    def __init__(self, exclude=()):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: Dict[int, int] = {}

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.skip:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _state(seed=0):
    return StepState(epoch=0, step=0, steps_per_epoch=1, total_steps=1, progress=0.0, lr=1e-3, wd=0.0,
                     teacher_momentum=0.996, backward=lambda loss: loss.backward(), device=torch.device("cpu"),
                     generator=torch.Generator().manual_seed(seed))


def _fwd_bwd_flops(fn: Callable[[], torch.Tensor]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn().backward()
    return counter.get_total_flops()


def ibot_step(batch: int = 4, seed: int = 0) -> Dict[str, object]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    crops = [torch.randn(batch, 3, 224, 224, generator=gen) for _ in range(2)] + \
            [torch.randn(batch, 3, 96, 96, generator=gen) for _ in range(10)]
    out: Dict[str, object] = {"batch_per_crop": batch, "global_crops": 2, "local_crops": 10, "img_size": 224,
                              "local_size": 96, "arch": "vit_small/16", "mask": "attmask_high", "K": 8192}
    method = initial = None
    for name, overrides in (("before", ["method.patch_head=all", "method.fused_loss=false"]), ("after", []),
                            ("after_fuse_last_layer", ["method.fuse_last_layer=true"])):
        # No drop-path: both paths then see the same network (FLOPs do not depend on it).
        cfg = load_config(config="ibot_vits16_attmask_high", overrides=overrides + ["model.drop_path_rate=0"])
        m = get_method("ibot")(cfg, 1000)
        if initial is None:
            initial = {k: v.clone() for k, v in m.state_dict().items()}
        m.load_state_dict(initial)
        method = m
        params = list(m.parameters())
        saved = SavedBytes(exclude=params)
        with FlopCounterMode(display=False) as counter:
            with saved.hooks():
                loss, parts = m.training_step((crops, None), _state(seed))
            held = saved.total
            loss.backward()
        # (FlopCounterMode does not see the GEMMs inside sdist_loss_linear: that row's FLOPs leave out
        # the last layer's, which are those of "after" plus one recompute in backward.)
        out[name] = {"step_flops": counter.get_total_flops(), "saved_bytes": held, "loss": loss.item(),
                     "masked_fraction": parts["mask_ratio"].item(),
                     "patch_head": "masked" if m.masked_patch_head else "all", "fused_loss": m.loss_fn.fused}

    # The student's patch head alone on what each path feeds it (forward + backward).
    head = method.student.head
    n_tok = 2 * batch * 196
    feats = torch.randn(2 * batch, 196, 384, requires_grad=True)
    mask = torch.rand(2 * batch, 196, generator=gen) < EXPECTED_MASKED_FRACTION
    ids = masked_token_ids(mask)
    all_flops = _fwd_bwd_flops(lambda: head.forward_patch(feats).sum())
    per_token = all_flops // n_tok
    masked_flops = _fwd_bwd_flops(lambda: head.forward_patch(gather_rows(feats, ids)).sum())
    assert all_flops == per_token * n_tok and masked_flops == per_token * ids.shape[1]  # linear in tokens
    expected_masked = EXPECTED_MASKED_FRACTION * n_tok
    out["patch_head"] = {"flops_per_token_fwd_bwd": per_token, "tokens_all": n_tok,
                         "before_flops": all_flops, "after_flops_at_default_masking": per_token * expected_masked,
                         "cut_at_default_masking": 1.0 / EXPECTED_MASKED_FRACTION,
                         "step_masked_fraction": out["after"]["masked_fraction"],
                         "cut_at_this_step_mask": 1.0 / max(out["after"]["masked_fraction"], 1e-9)}
    b, a = out["before"], out["after"]
    out["step_flops_cut"] = b["step_flops"] / a["step_flops"]
    out["step_saved_bytes_cut"] = b["saved_bytes"] / a["saved_bytes"]
    out["step_saved_bytes_cut_fuse_last_layer"] = b["saved_bytes"] / out["after_fuse_last_layer"]["saved_bytes"]
    # At the default masking the step saves exactly the head's share at the expected token count.
    saved_flops = per_token * (n_tok - expected_masked)
    out["step_flops_at_default_masking"] = {"before": b["step_flops"], "after": b["step_flops"] - saved_flops,
                                            "cut": b["step_flops"] / (b["step_flops"] - saved_flops)}
    return out


def loss_memory(batch: int = 64, k: int = 65536, n_crops: int = 12, bottleneck: int = 256) -> Dict[str, object]:
    """Last layer (z [rows, 256] -> K logits) + CLS loss: bytes held for backward, per path."""
    from fastmask import ops

    gen = torch.Generator().manual_seed(0)
    rows = n_crops * batch
    teacher32 = torch.randn(2 * batch, k, generator=gen) * 3
    weight = torch.nn.functional.normalize(torch.randn(k, bottleneck, generator=gen), dim=-1).requires_grad_()
    z32 = torch.nn.functional.normalize(torch.randn(rows, bottleneck, generator=gen), dim=-1) * 8
    pair = torch.ones(2, n_crops)
    pair[:, :2].fill_diagonal_(0.0)
    pair /= pair.sum()
    row_w = torch.full((batch,), 1.0 / batch)
    out: Dict[str, object] = {"B": batch, "K": k, "crops": n_crops, "student_rows": rows, "bottleneck": bottleneck,
                              "what": "bytes saved for backward by the last layer + the CLS loss (storages once, "
                                      "the weight parameter excluded)"}
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        teacher = teacher32.to(dtype)
        paths = {
            "today": lambda z: DINOLoss(k, n_global=2, fused=False)(
                torch.nn.functional.linear(z, weight.to(dtype)), teacher, 0.04),
            "op": lambda z: DINOLoss(k, n_global=2, fused=True)(
                torch.nn.functional.linear(z, weight.to(dtype)), teacher, 0.04),
            "op_linear": lambda z: ops.sdist_loss_linear(z, weight, teacher, torch.zeros(k), 0.1, 0.04,
                                                         pair_weight=pair, row_weight=row_w),
        }
        for name, loss_of in paths.items():
            z = z32.to(dtype).requires_grad_()
            saved = SavedBytes(exclude=[weight])
            with saved.hooks():
                loss = loss_of(z)
            held = saved.total
            loss.backward()
            out[f"{name}_{tag}"] = {"saved_bytes": held, "loss": loss.item()}
            weight.grad = None
        # The loss alone, on logits the head made (what the loss itself adds to the head's memory).
        for name, fused in (("today", False), ("op", True)):
            logits = (torch.nn.functional.linear(z32, weight.detach()).to(dtype)).requires_grad_()
            saved = SavedBytes(exclude=[weight])
            with saved.hooks():
                loss = DINOLoss(k, n_global=2, fused=fused)(logits, teacher, 0.04)
            held = saved.total
            loss.backward()
            out[f"loss_only_{name}_{tag}"] = {"saved_bytes": held, "loss": loss.item()}
        out[f"loss_only_op_{tag}"]["cut_vs_today"] = (out[f"loss_only_today_{tag}"]["saved_bytes"]
                                                      / out[f"loss_only_op_{tag}"]["saved_bytes"])
    for tag in ("fp32", "bf16"):
        base = out[f"today_{tag}"]["saved_bytes"]
        for variant in ("op", "op_linear"):
            entry = out[f"{variant}_{tag}"]
            entry["cut_vs_today"] = base / entry["saved_bytes"]
            entry["loss_diff_vs_today"] = abs(entry["loss"] - out[f"today_{tag}"]["loss"])
    return out


def run_all() -> Dict[str, object]:
    torch.set_num_threads(1)
    return {"ibot_step": ibot_step(), "loss_memory": loss_memory()}


# ----------------------------------------------------------------------------------- pytest view

def test_ibot_attmask_patch_head_flops_cut():
    r = ibot_step(batch=2)
    assert r["patch_head"]["cut_at_default_masking"] >= 5.0
    assert r["after"]["step_flops"] < r["before"]["step_flops"]
    assert abs(r["after"]["loss"] - r["before"]["loss"]) < 1e-3 * abs(r["before"]["loss"])


def test_loss_memory_cut_at_65536():
    r = loss_memory(batch=8)  # (the results file has B=64)
    for tag in ("fp32", "bf16"):
        assert r[f"op_linear_{tag}"]["cut_vs_today"] >= 4.0
        assert r[f"op_linear_{tag}"]["loss_diff_vs_today"] < 1e-4 * r[f"today_{tag}"]["loss"]
    assert r["loss_only_op_bf16"]["cut_vs_today"] >= 4.0


if __name__ == "__main__":
    results = run_all()
    path = os.path.join(HERE, "results", "loss-cpu.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
