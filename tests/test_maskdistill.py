"""Masked Distillation on tiny ViTs (CPU).

What is checked: a few optimiser steps lower the loss (each loss kind, linear and transformer
decoders, a teacher of another width); targets are the teacher's whitened block outputs of the
configured layer; the loss only sees masked positions and the student only sees mask tokens there;
masks hide 40% of the patches in blocks; the teacher is frozen; a teacher with another patch size
is fed a resized image on the student's grid; the recipes load; bad options raise ValueError.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmask.config import ModelConfig, TeacherConfig, TrainConfig, load_config
from fastmask.methods import get_method
from fastmask.methods.maskdistill import MaskDistill, MaskDistillConfig, distill_loss, whiten
from helpers import image_batch, step_state


pytestmark = pytest.mark.usefixtures("one_thread")


def make_method(img_size=16, patch_size=4, seed=0, student_dim=32, **method):
    torch.manual_seed(seed)
    cfg = TrainConfig(model=ModelConfig(arch="vit_tiny", patch_size=patch_size, img_size=img_size,
                                        drop_path_rate=0.0, depth=2, embed_dim=student_dim, num_heads=2))
    teacher = dict(arch="vit_tiny", depth=2, embed_dim=48, num_heads=2)
    teacher.update({k.removeprefix("teacher_"): method.pop(k) for k in list(method)
                    if k in ("teacher_depth", "teacher_patch_size")})
    cfg.method = MaskDistillConfig(teacher=TeacherConfig(**teacher), **{"mask_min_patches": 2, **method})
    with pytest.warns(UserWarning, match="randomly initialised"):
        return MaskDistill(cfg, num_classes=3)


def make_batch(n=8, img_size=16, seed=1):
    return image_batch(n, img_size, 3, seed)


def train_steps(method, steps, lr=3e-3):
    params = [p for g in method.param_groups(0.0) for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = make_batch()
    losses = []
    method.train()
    for step in range(steps):
        # The same masks every step: the decrease measures fitting, not mask luck.
        loss, metrics = method.training_step(batch, step_state(seed=0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("loss,decoder", [("smooth_l1", "linear"), ("mse", "linear"), ("cosine", "transformer")])
def test_a_few_steps_lower_the_loss(loss, decoder):
    method = make_method(loss=loss, decoder=decoder, decoder_depth=1)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    losses = train_steps(method, 12)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in method.teacher.state_dict().items():  # frozen
        assert torch.equal(v, teacher_before[k]), k


def test_registry_and_class_attributes():
    assert get_method("maskdistill") is MaskDistill
    assert MaskDistill.pipeline == "supervised" and not MaskDistill.manual_backward
    method = make_method()
    assert not any(p.requires_grad for p in method.teacher.parameters())
    trainable = {id(p) for g in method.param_groups(0.05) for p in g["params"]}
    assert trainable == {id(p) for p in list(method.student.parameters()) + list(method.decoder.parameters())}
    method.train()
    assert method.student.training and not method.teacher.training
    assert method.eval_backbone() is method.student


@pytest.mark.parametrize("layer", [0, -1])
def test_targets_are_whitened_teacher_block_outputs(layer):
    method = make_method(teacher_depth=3, teacher_layer=layer)
    depth_used = 1 if layer == 0 else 3
    assert len(method.teacher.blocks) == depth_used  # later blocks are never run: dropped
    x, _ = make_batch()
    tokens = method.teacher.embed(x)
    for blk in method.teacher.blocks:
        tokens = blk(tokens)
    raw = tokens[:, 1:]
    expected = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(raw.var(-1, unbiased=False, keepdim=True) + 1e-6)
    got = method.teacher_targets(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.shape == (8, 16, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got.mean(-1), torch.zeros(8, 16), atol=1e-5, rtol=0)


def test_loss_uses_only_masked_positions():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    for kind in ("smooth_l1", "mse", "cosine"):
        base = distill_loss(pred, target, mask, kind)
        visible_changed = torch.where(mask.unsqueeze(-1), pred, pred + 10.0)
        assert distill_loss(visible_changed, target, mask, kind) == base
        hidden_changed = torch.where(mask.unsqueeze(-1), pred + 1.0, pred)
        assert distill_loss(hidden_changed, target, mask, kind) != base
    p, t = pred[mask], target[mask]
    torch.testing.assert_close(distill_loss(pred, target, mask, "mse"), ((p - t) ** 2).mean())
    torch.testing.assert_close(distill_loss(pred, target, mask, "cosine"), (1 - F.cosine_similarity(p, t, dim=-1)).mean())
    d = (p - t).abs()
    torch.testing.assert_close(distill_loss(pred, target, mask, "smooth_l1", beta=0.5),
                               torch.where(d < 0.5, 0.5 * d ** 2 / 0.5, d - 0.25).mean())
    # Nothing hidden: zero loss that still backpropagates (no NaN from an empty mean).
    empty = distill_loss(pred.requires_grad_(), target, torch.zeros(2, 6, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_step_masks_forty_percent_in_blocks_and_feeds_mask_tokens():
    method = make_method(img_size=32, patch_size=4)  # 8x8 grid
    x, y = make_batch(img_size=32)
    seen = {}
    orig = method.student.forward_features

    def spy(images, **kw):
        seen["mask"] = kw["mask"]
        return orig(images, **kw)

    method.student.forward_features = spy
    loss, metrics = method.training_step((x, y), step_state(seed=3))
    mask = seen["mask"]
    assert mask.shape == (8, 64) and mask.dtype == torch.bool
    assert (mask.sum(1) == int(0.4 * 64)).all()
    assert metrics["mask_ratio"] == pytest.approx(int(0.4 * 64) / 64)
    assert "loss" not in metrics  # the driver logs the returned loss; a float here would shadow it
    # Block-wise: most hidden patches have a hidden 4-neighbour (random masks would have far fewer).
    grid = mask.view(8, 8, 8)
    nb = torch.zeros_like(grid)
    nb[:, 1:] |= grid[:, :-1]
    nb[:, :-1] |= grid[:, 1:]
    nb[:, :, 1:] |= grid[:, :, :-1]
    nb[:, :, :-1] |= grid[:, :, 1:]
    assert (nb & grid).sum() >= 0.9 * grid.sum()
    # Only the masked positions reach the loss: the gradient w.r.t. the decoder input is zero elsewhere.
    feats = orig(x, mask=mask).patch.detach().requires_grad_()
    distill_loss(method.decoder(feats), method.teacher_targets(x), mask).backward()
    assert feats.grad[~mask].abs().max() == 0 and feats.grad[mask].abs().max() > 0
    # Same seed, same masks (resumable runs).
    method.training_step((x, y), step_state(seed=3))
    assert torch.equal(seen["mask"], mask)


def test_teacher_with_another_patch_size_sees_a_resized_image():
    method = make_method(img_size=16, patch_size=4, teacher_patch_size=2)
    assert method.teacher_img_size == (8, 8) and tuple(method.teacher.grid_size) == (4, 4)
    x, _ = make_batch()
    assert method.teacher_targets(x).shape == (8, 16, 48)
    losses = train_steps(method, 3)
    assert all(math.isfinite(v) for v in losses)


def test_clip_input_normalisation():
    method = make_method(teacher_input_norm="clip")
    raw = torch.rand(1, 3, 4, 4)
    imagenet = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    clip = (raw - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet * method.teacher_in_scale + method.teacher_in_shift, clip)


@pytest.mark.parametrize("bad", [dict(loss="l1"), dict(decoder="mlp"), dict(mask_ratio=1.0), dict(mask_ratio=0.0),
                                 dict(teacher_input_norm="openai"), dict(mask_min_patches=0)])
def test_bad_config_raises_value_error(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        MaskDistillConfig(**bad)
    with pytest.raises(ValueError, match="method.teacher.depth"):
        TeacherConfig(depth=-1)


def test_teacher_layer_out_of_range():
    with pytest.raises(ValueError, match="teacher_layer"):
        make_method(teacher_layer=5)


@pytest.mark.parametrize("recipe", ["maskdistill_vitb16_clip", "maskdistill_tiny_builtin"])
def test_recipes_load(recipe):
    cfg = load_config(config=recipe)
    assert cfg.method_name == "maskdistill" and isinstance(cfg.method, MaskDistillConfig)
    assert cfg.method.mask_ratio == 0.4 and cfg.method.loss == "smooth_l1"
    if recipe == "maskdistill_vitb16_clip":
        assert cfg.epochs == 300 and cfg.model.arch == "vit_base" and cfg.model.patch_size == 16
        assert cfg.optim.lr * 2048 / 256 == pytest.approx(1.5e-3) and cfg.optim.weight_decay == 0.05
        assert cfg.method.teacher_input_norm == "clip" and cfg.method.teacher.pre_norm
        assert cfg.method.teacher.act_layer == "quick_gelu" and cfg.method.teacher.patch_size == 16
