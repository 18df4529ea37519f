"""The lean loss paths give today's losses and gradients (issue 20).

* DINO / iBOT losses through ``fastmask.ops.sdist_loss`` (``fused=True``) against today's formula;
* iBOT's patch term on the masked rows only (``masked_ids``) against today's ``[2B, N, K]`` form, with
  masks that hide nothing in some rows and everything in others;
* the iBOT method with its patch head on the masked tokens only, for every masking policy, against
  the head on every token (the official code) — same loss, same gradient on every parameter;
* Masked Distillation's linear decoder on the masked positions only against the full decoder.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmask.config import ModelConfig, TeacherConfig, TrainConfig, load_config
from fastmask.methods import get_method
from fastmask.methods.ibot import MASK_POLICIES
from fastmask.methods.losses import DINOLoss, IBOTLoss, gather_rows, masked_token_ids
from fastmask.methods.maskdistill import MaskDistill, MaskDistillConfig, distill_loss
from helpers import step_state


pytestmark = pytest.mark.usefixtures("one_thread")


def today_dino(student, teacher, center, n_global, ts, tt):
    """DINOLoss.forward before issue 20 (the official formula)."""
    b = teacher.shape[0] // n_global
    n_crops = student.shape[0] // b
    s = F.log_softmax(student.float() / ts, dim=-1).chunk(n_crops)
    t = F.softmax((teacher.float() - center) / tt, dim=-1).detach().chunk(n_global)
    terms = [torch.sum(-t[q] * s[v], dim=-1).mean() for q in range(n_global) for v in range(n_crops) if v != q]
    return sum(terms) / len(terms)


def today_ibot_patch(student_patch, teacher_patch, center_patch, masks, n_global, ts, tt):
    """IBOTLoss's patch term before issue 20: every token, then multiplied by the mask."""
    s = F.log_softmax(student_patch.float() / ts, dim=-1).chunk(n_global)
    t = F.softmax((teacher_patch.float() - center_patch) / tt, dim=-1).detach().chunk(n_global)
    m = masks.chunk(n_global)
    total = 0.0
    for v in range(n_global):
        mask = m[v].float()
        per_token = torch.sum(-t[v] * s[v], dim=-1)
        total = total + ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()
    return total / n_global


def edge_masks(rows, n, seed=0):
    masks = torch.rand(rows, n, generator=torch.Generator().manual_seed(seed)) < 0.3
    masks[0] = False  # nothing hidden
    masks[1] = True   # everything hidden
    masks[-1] = False
    masks[-1, -1] = True  # one token
    return masks


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dino_loss_paths_match_today(fused, dtype):
    torch.manual_seed(0)
    b, k, n_crops = 3, 37, 6
    student = (torch.randn(n_crops * b, k) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(2 * b, k) * 2).to(dtype)
    loss_fn = DINOLoss(k, n_global=2, fused=fused)
    loss_fn.center.normal_()
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, teacher_temp=0.05)
    ref = today_dino(student, teacher, center, 2, 0.1, 0.05)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0].float(),
                               torch.autograd.grad(ref, student)[0].float(), **tol)
    torch.testing.assert_close(loss_fn.center, center * 0.9 + teacher.float().mean(0, keepdim=True) * 0.1)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("masked_rows", [False, True])
def test_ibot_loss_paths_match_today(fused, masked_rows):
    torch.manual_seed(0)
    b, n, k, n_crops = 4, 9, 23, 5
    s_cls = torch.randn(n_crops * b, k, requires_grad=True)
    t_cls = torch.randn(2 * b, k)
    s_patch = torch.randn(2 * b, n, k, requires_grad=True)
    t_patch = torch.randn(2 * b, n, k)
    masks = edge_masks(2 * b, n)
    loss_fn = IBOTLoss(k, k, n_global=2, fused=fused, lambda_patch=0.7)
    loss_fn.center.normal_()
    loss_fn.center_patch.normal_()
    center, center_patch = loss_fn.center.clone(), loss_fn.center_patch.clone()

    ids = None
    student_patch = s_patch
    if masked_rows:
        ids = masked_token_ids(masks)
        assert ids.shape == (1, int(masks.sum()))
        student_patch = gather_rows(s_patch, ids)  # what the method's head sees
    loss, parts = loss_fn(s_cls, student_patch, t_cls, t_patch, masks, 0.04, 0.06, masked_ids=ids)

    ref_cls = today_dino(s_cls, t_cls, center, 2, 0.1, 0.04)
    ref_patch = 0.7 * today_ibot_patch(s_patch, t_patch, center_patch, masks, 2, 0.1, 0.06)
    torch.testing.assert_close(parts["loss_cls"], ref_cls.detach())
    torch.testing.assert_close(parts["loss_patch"], ref_patch.detach())
    grads = torch.autograd.grad(loss, [s_cls, s_patch])
    ref_grads = torch.autograd.grad(ref_cls + ref_patch, [s_cls, s_patch])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(grads[1][~masks]) == 0
    # centres: the patch centre is the mean over every teacher patch token, masked or not
    torch.testing.assert_close(loss_fn.center_patch, center_patch * 0.9 + t_patch.mean((0, 1)) * 0.1)


def test_ibot_loss_no_masked_token_at_all():
    k = 11
    loss_fn = IBOTLoss(k, k, n_global=2, fused=True)
    masks = torch.zeros(4, 5, dtype=torch.bool)
    ids = masked_token_ids(masks)
    _, parts = loss_fn(torch.randn(6, k), torch.randn(0, k), torch.randn(4, k), torch.randn(4, 5, k), masks,
                       0.04, 0.04, masked_ids=ids)
    assert ids.shape == (1, 0) and parts["loss_patch"].item() == 0.0


# ---------------------------------------------------------------------------------- the methods

TINY = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=8", "model.img_size=32",
        "data.image_size=32", "data.local_size=16", "method.out_dim=64", "method.patch_out_dim=64",
        "method.head_hidden_dim=32", "method.head_bottleneck_dim=16", "method.head_use_bn=false",
        "method.mask_prob=0.5", "method.block_min_patches=2"]


def _step_grads(method, crops):
    method.zero_grad(set_to_none=True)
    loss, parts = method.training_step((crops, None), step_state(teacher_momentum=0.9))
    loss.backward()
    return loss.detach(), parts, {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mask", MASK_POLICIES)
def test_ibot_masked_patch_head_matches_all_tokens(mask):
    gen = torch.Generator().manual_seed(3)
    crops = [torch.randn(6, 3, 32, 32, generator=gen) for _ in range(2)] + \
            [torch.randn(6, 3, 16, 16, generator=gen) for _ in range(2)]
    cfg_all = load_config(config="ibot_tiny_builtin",
                          overrides=TINY + [f"method.mask={mask}", "method.patch_head=all", "method.fused_loss=false"])
    cfg_lean = load_config(config="ibot_tiny_builtin", overrides=TINY + [f"method.mask={mask}"])
    assert cfg_lean.method.patch_head == "auto" and cfg_lean.method.fused_loss
    torch.manual_seed(0)
    today = get_method("ibot")(cfg_all, 10)
    lean = get_method("ibot")(cfg_lean, 10)
    lean.load_state_dict(today.state_dict())
    assert lean.masked_patch_head and not today.masked_patch_head
    loss_a, parts_a, grads_a = _step_grads(today, crops)
    loss_b, parts_b, grads_b = _step_grads(lean, crops)
    assert 0.0 < parts_b["mask_ratio"].item() < 1.0
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts_b["loss_patch"], parts_a["loss_patch"], rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        # atol 1e-5: the mask token's gradient sums over every hidden position in a different order.
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(lean.loss_fn.center_patch, today.loss_fn.center_patch)


def test_ibot_patch_head_option_checks():
    with pytest.raises(ValueError, match="patch_head must be one of"):
        load_config(config="ibot_tiny_builtin", overrides=TINY + ["method.patch_head=some"])
    with pytest.raises(ValueError, match="BatchNorm"):
        load_config(config="ibot_tiny_builtin", overrides=TINY + ["method.patch_head=masked", "method.head_use_bn=true"])
    cfg = load_config(config="ibot_tiny_builtin", overrides=TINY + ["method.head_use_bn=true"])
    assert not get_method("ibot")(cfg, 10).masked_patch_head  # BatchNorm: the head sees every token


@pytest.mark.parametrize("kind", ["smooth_l1", "mse", "cosine"])
def test_maskdistill_masked_decoder_matches_full(kind):
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(arch="vit_tiny", patch_size=4, img_size=16, drop_path_rate=0.0, depth=2,
                                        embed_dim=32, num_heads=2))
    cfg.method = MaskDistillConfig(teacher=TeacherConfig(arch="vit_tiny", depth=2, embed_dim=48, num_heads=2),
                                   mask_min_patches=2, loss=kind)
    with pytest.warns(UserWarning, match="randomly initialised"):
        method = MaskDistill(cfg, num_classes=3)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loss, metrics = method.training_step((images, None), step_state(2, teacher_momentum=0.9))
    params = [p for p in method.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    # Today's path: the decoder on every token, the loss masked afterwards (same masks: same generator seed).
    mask = method.mask_policy(5, tuple(method.student.grid_size), generator=step_state(2, teacher_momentum=0.9).generator)
    assert int(mask.sum(1).unique().item()) == int(0.4 * 16)
    pred = method.decoder(method.student.forward_features(images, mask=mask).patch)
    ref = distill_loss(pred, method.teacher_targets(images), mask, kind)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert metrics["mask_ratio"].item() == pytest.approx(0.375)


@pytest.mark.parametrize("method_name", ["dino", "ibot"])
def test_fuse_last_layer_matches_today(method_name):
    gen = torch.Generator().manual_seed(5)
    crops = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)] + \
            [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2)]
    if method_name == "ibot":
        recipe, base = "ibot_tiny_builtin", TINY + ["method.mask=attmask_hint"]
        today_opts = ["method.patch_head=all", "method.fused_loss=false"]
    else:
        recipe = "dino_tiny_builtin"
        base = TINY[:8] + ["method.head_hidden_dim=32", "method.head_bottleneck_dim=16", "method.head_use_bn=false",
                           "method.student_mask=attmask_high"]
        today_opts = ["method.fused_loss=false"]
    torch.manual_seed(0)
    today = get_method(method_name)(load_config(config=recipe, overrides=base + today_opts), 10)
    fused = get_method(method_name)(load_config(config=recipe, overrides=base + ["method.fuse_last_layer=true"]), 10)
    fused.load_state_dict(today.state_dict())
    loss_a, _, grads_a = _step_grads(today, crops)
    loss_b, _, grads_b = _step_grads(fused, crops)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
