"""The ops and mask policies a training step calls never make the host wait for the GPU.

A device sync in the step (reading a number back, a data-dependent output size, a pageable copy)
stops the host from queueing work ahead, so the GPU idles while the next kernels are launched.
With value checks off (the training default) every op here must run under
``torch.cuda.set_sync_debug_mode("error")``, which turns each synchronising call into an error.
GPU only: without CUDA there is nothing to synchronise with.
"""
import contextlib

import pytest
import torch

from fastmask import masking, ops
from helpers import KERNEL_BACKENDS

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _step_ops(backend, generator):
    """One call of each op as a masked training step makes it (B = 32 ViT-S/16 images)."""
    B, N, D, H, Dh = 32, 196, 384, 6, 64
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, N, D, device="cuda", dtype=torch.bfloat16)
    mask_token = torch.zeros(D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    attn = torch.rand(B, N, device="cuda").softmax(-1)
    ratio = masking.sample_ratios(B, 0.1, 0.5, generator=generator, device="cuda")
    q = torch.randn(B, H, N + 1, Dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        masked = ops.random_masking(x, 0.75, generator=generator, pos_embed=pos, backend=backend)
        full = ops.scatter_tokens(masked.x_kept, masked.ids_keep, N, mask_token, backend=backend)
        hidden = ops.cls_attention_mask(attn, ratio, mode="hint", mask_prob=0.5, show_max=0.1,
                                        show_ratio=0.03, generator=generator, backend=backend)
        filled = ops.apply_mask_token(x, hidden, mask_token, backend=backend)
        keep = ops.topk_tokens(attn, 98, backend=backend)
        kept = ops.gather_tokens(x, keep, backend=backend)
        out = (full.float().sum() + filled.float().sum() + kept.float().sum())
        if backend == "triton":  # attention has no CUDA C++ kernel
            o, cls_attn = ops.attention(q, q, q, return_cls_attn=True, backend=backend)
            out = out + o.float().sum() + cls_attn.sum()
        out.backward()
        return out

    return run


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_training_step_ops_do_not_sync(backend):
    generator = torch.Generator(device="cuda").manual_seed(0)
    run = _step_ops(backend, generator)
    with ops.value_checks(False):
        run()  # compile, autotune and allocate first
        with syncs_are_errors():
            run()


def test_mask_policies_do_not_sync():
    generator = torch.Generator(device="cuda").manual_seed(1)
    attn = torch.rand(64, 196, device="cuda")
    policies = [masking.build_mask_policy("random", ratio=(0.1, 0.5), mask_prob=0.5),
                masking.build_mask_policy("block", ratio=(0.1, 0.5), mask_prob=0.5)] + [
        masking.build_mask_policy(f"attmask_{mode}") for mode in ("high", "low", "hint")]
    with ops.value_checks(False):
        for policy in policies:
            policy(64, (14, 14), cls_attn=attn, generator=generator, device="cuda")
            with syncs_are_errors():
                mask = policy(64, (14, 14), cls_attn=attn, generator=generator, device="cuda")
            assert mask.shape == (64, 196) and mask.dtype == torch.bool
        masking.maskedkd_keep_ids(attn, 98)
        with syncs_are_errors():
            masking.maskedkd_keep_ids(attn, 98)


def test_masked_distillation_loss_does_not_sync():
    from fastmask.methods.maskdistill import LOSSES, distill_loss

    pred = torch.randn(8, 196, 64, device="cuda", requires_grad=True)
    target = torch.randn(8, 196, 64, device="cuda")
    mask = torch.rand(8, 196, device="cuda") < 0.4
    for kind in LOSSES:
        distill_loss(pred, target, mask, kind).backward()
        with syncs_are_errors():
            distill_loss(pred, target, mask, kind).backward()
