"""Self-distillation methods (dino, ibot): losses, masking of the student's views, AttMask.

Tiny ViTs on CPU; FASTMASK_BACKEND=torch (conftest).  The optimisation tests train on one small
batch of the built-in shapes dataset repeated, so "the loss goes down" does not depend on luck.
"""
from __future__ import annotations


import pytest
import torch

from fastmask.config import load_config
from fastmask.methods import get_method
from fastmask.methods.base import StepState
from fastmask import ops
from fastmask.methods.dino import drop_keep_ids
from fastmask.methods.losses import DINOLoss, IBOTLoss, teacher_temperature

TINY_MODEL = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=8",
              "model.img_size=32", "data.image_size=32", "data.local_size=16"]
TINY_HEAD = ["method.out_dim=64", "method.head_hidden_dim=32", "method.head_bottleneck_dim=16"]


def tiny_cfg(recipe: str, *overrides: str):
    return load_config(config=recipe, overrides=TINY_MODEL + TINY_HEAD + list(overrides))


def make_state(step=0, epoch=0, momentum=0.9, generator_seed=0):
    gen = torch.Generator().manual_seed(generator_seed)
    return StepState(epoch=epoch, step=step, steps_per_epoch=10, total_steps=100, progress=step / 100,
                     lr=1e-3, wd=0.0, teacher_momentum=momentum, backward=lambda loss: loss.backward(),
                     device=torch.device("cpu"), generator=gen)


@pytest.fixture(scope="module")
def shapes_batch():
    """One multi-crop batch of 16 real images (2 global 32 px + 2 local 16 px crops)."""
    cfg = tiny_cfg("dino_tiny_builtin", "data.batch_size=16", "data.num_workers=0", "data.num_local_crops=2")
    from fastmask.data import make_loader

    loader = make_loader(cfg.data, "train", "multicrop", seed=0)
    loader.set_epoch(0)
    crops, labels = next(iter(loader))
    return [c.float() for c in crops], labels


def random_crops(b=4, n_local=2, g=32, l=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, g, g, generator=gen) for _ in range(2)]
            + [torch.randn(b, 3, l, l, generator=gen) for _ in range(n_local)])


class ForwardSpy:
    """Records the keyword arguments of every forward_features call of a backbone."""

    def __init__(self, backbone):
        self.calls = []
        self.orig = backbone.forward_features
        backbone.forward_features = self

    def __call__(self, x, **kw):
        out = self.orig(x, **kw)
        self.calls.append({"shape": tuple(x.shape), **kw, "out": out})
        return out


# ------------------------------------------------------------------------------------- losses

def test_teacher_temperature_warmup():
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temperature(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(99, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(0, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_dino_loss_matches_explicit_pairs():
    torch.manual_seed(0)
    b, k, n_crops = 3, 11, 4
    student = torch.randn(n_crops * b, k)
    teacher = torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, n_global=2, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.normal_()
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, teacher_temp=0.05)
    # explicit: every (teacher view q, student view v != q) pair
    t = torch.softmax((teacher - center) / 0.05, -1).chunk(2)
    s = torch.log_softmax(student / 0.1, -1).chunk(n_crops)
    terms = [(-t[q] * s[v]).sum(-1).mean() for q in range(2) for v in range(n_crops) if v != q]
    assert len(terms) == 2 * (n_crops - 1)
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # center: EMA of the batch mean of the teacher outputs
    torch.testing.assert_close(loss_fn.center, center * 0.9 + teacher.mean(0, keepdim=True) * 0.1)


def test_ibot_loss_patch_term_only_on_masked_tokens():
    torch.manual_seed(0)
    b, n, k = 3, 5, 7
    loss_fn = IBOTLoss(k, k, n_global=2)
    s_cls, t_cls = torch.randn(4 * b, k), torch.randn(2 * b, k)
    s_patch, t_patch = torch.randn(2 * b, n, k), torch.randn(2 * b, n, k)
    none = torch.zeros(2 * b, n, dtype=torch.bool)
    _, parts = loss_fn(s_cls, s_patch, t_cls, t_patch, none, 0.04, 0.04)
    assert parts["loss_patch"].item() == 0.0
    masks = torch.rand(2 * b, n, generator=torch.Generator().manual_seed(1)) < 0.5
    masks[0] = False  # a sample without masked tokens contributes 0
    loss_fn2 = IBOTLoss(k, k, n_global=2)
    _, parts = loss_fn2(s_cls, s_patch, t_cls, t_patch, masks, 0.04, 0.04)
    t = torch.softmax(t_patch / 0.04, -1)
    s = torch.log_softmax(s_patch / 0.1, -1)
    per_tok = (-t * s).sum(-1)
    per_sample = (per_tok * masks).sum(-1) / masks.sum(-1).clamp_min(1)
    expected = torch.stack([per_sample[:b].mean(), per_sample[b:].mean()]).mean()
    torch.testing.assert_close(parts["loss_patch"], expected)
    # changing unmasked student patch outputs changes nothing
    s_patch2 = s_patch.clone()
    s_patch2[~masks] += 5.0
    _, parts2 = IBOTLoss(k, k, n_global=2)(s_cls, s_patch2, t_cls, t_patch, masks, 0.04, 0.04)
    torch.testing.assert_close(parts2["loss_patch"], expected)


def test_drop_mode_ids_and_masks_come_from_one_random_keep():
    from fastmask.models import create_vit

    backbone = create_vit("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=32, num_heads=2)
    crops = [torch.zeros(5, 3, 32, 32), torch.zeros(3, 3, 32, 32)]
    ids, masks = drop_keep_ids(crops, backbone, 0.3, generator=torch.Generator().manual_seed(2))
    kept = ops.random_keep(8, 16, 0.3, generator=torch.Generator().manual_seed(2))
    assert [i.shape for i in ids] == [(5, 11), (3, 11)] and [m.shape for m in masks] == [(5, 16), (3, 16)]
    torch.testing.assert_close(torch.cat(ids), kept.ids_keep)
    torch.testing.assert_close(torch.cat(masks), kept.mask)
    for i, m in zip(torch.cat(ids), torch.cat(masks)):
        assert i.tolist() == (~m).nonzero().flatten().tolist()
    with pytest.raises(ValueError, match="one size"):
        drop_keep_ids([crops[0], torch.zeros(2, 3, 16, 16)], backbone, 0.3)


# ------------------------------------------------------------------------------------- dino masking

@pytest.mark.parametrize("mode", ["mask_token", "drop"])
def test_student_global_masking_leaves_locals_and_teacher_clean(mode):
    cfg = tiny_cfg("dino_tiny_builtin", "method.student_mask=random", f"method.student_mask_mode={mode}",
                   "method.student_mask_ratio=0.5")
    torch.manual_seed(0)
    method = get_method("dino")(cfg, 10)
    s_spy = ForwardSpy(method.student.backbone)
    t_spy = ForwardSpy(method.teacher.backbone)
    crops = random_crops(b=4, n_local=3)
    loss, metrics = method.training_step((crops, None), make_state())
    assert torch.isfinite(loss)
    # teacher: one call on the two global views, clean
    assert len(t_spy.calls) == 1
    t_call = t_spy.calls[0]
    assert t_call["shape"] == (8, 3, 32, 32)
    assert t_call.get("mask") is None and t_call.get("ids_keep") is None
    # student: globals (8 images at 32 px) masked, locals (12 at 16 px) clean
    by_shape = {c["shape"]: c for c in s_spy.calls}
    g, l = by_shape[(8, 3, 32, 32)], by_shape[(12, 3, 16, 16)]
    assert l.get("mask") is None and l.get("ids_keep") is None
    n = 16  # (32 / 8) ** 2 patches
    if mode == "mask_token":
        assert g["ids_keep"] is None
        assert g["mask"].shape == (8, n) and g["mask"].dtype == torch.bool
        assert (g["mask"].sum(1) == n // 2).all()
    else:
        assert g["mask"] is None
        assert g["ids_keep"].shape == (8, n - n // 2)
        assert g["out"].patch.shape[1] == n - n // 2
    assert metrics["mask_ratio"] == pytest.approx(0.5)


@pytest.mark.parametrize("method_name,mode", [("dino", "attmask_high"), ("dino", "attmask_low"),
                                              ("ibot", "attmask_high"), ("ibot", "attmask_low")])
def test_attmask_masks_are_topk_of_teacher_map(method_name, mode):
    if method_name == "dino":
        opts = [f"method.student_mask={mode}", "method.attmask_ratio=[0.25,0.25]", "method.attmask_prob=1.0"]
        recipe = "dino_tiny_builtin"
    else:
        opts = [f"method.mask={mode}", "method.mask_ratio=[0.25,0.25]", "method.mask_prob=1.0",
                "method.patch_out_dim=64"]
        recipe = "ibot_tiny_builtin"
    cfg = tiny_cfg(recipe, *opts)
    torch.manual_seed(0)
    method = get_method(method_name)(cfg, 10)
    t_spy = ForwardSpy(method.teacher.backbone)
    s_spy = ForwardSpy(method.student.backbone)
    crops = random_crops(b=6, n_local=2)
    method.training_step((crops, None), make_state())
    # the teacher ran once, on the global views, and returned its CLS map from that same forward
    assert len(t_spy.calls) == 1 and t_spy.calls[0]["return_cls_attn"] is True
    cls_attn = t_spy.calls[0]["out"].cls_attn  # [2B, N]
    student_global = [c for c in s_spy.calls if c["shape"][-1] == 32]
    assert len(student_global) == 1
    mask = student_global[0]["mask"]
    assert mask.shape == cls_attn.shape
    k = int(0.25 * cls_attn.shape[1])
    ref_ids = torch.topk(cls_attn, k, dim=1, largest=(mode == "attmask_high")).indices
    expected = torch.zeros_like(mask).scatter_(1, ref_ids, True)
    assert torch.equal(mask, expected)


def test_dino_without_mask_passes_no_mask():
    cfg = tiny_cfg("dino_tiny_builtin", "method.student_mask=none")
    method = get_method("dino")(cfg, 10)
    spy = ForwardSpy(method.student.backbone)
    method.training_step((random_crops(b=2), None), make_state())
    assert all(c.get("mask") is None and c.get("ids_keep") is None for c in spy.calls)


def test_ibot_block_masks_respect_gate_and_ratio():
    cfg = tiny_cfg("ibot_tiny_builtin", "method.mask=block", "method.mask_ratio=[0.25,0.25]",
                   "method.mask_prob=0.5", "method.patch_out_dim=64", "method.block_min_patches=2")
    method = get_method("ibot")(cfg, 10)
    spy = ForwardSpy(method.student.backbone)
    method.training_step((random_crops(b=32, n_local=0), None), make_state())
    mask = [c for c in spy.calls if c.get("mask") is not None][0]["mask"]
    counts = mask.sum(1)
    assert set(counts.tolist()) <= {0, 4}  # gated rows are clean, the others hide floor(0.25*16)
    assert 0 < (counts == 4).sum() < mask.shape[0]


def test_ema_teacher_update():
    cfg = tiny_cfg("dino_tiny_builtin", "method.student_mask=none")
    method = get_method("dino")(cfg, 10)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    t_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    s = dict(method.student.named_parameters())
    method.on_after_optimizer_step(make_state(momentum=0.75))
    for name, t in method.teacher.named_parameters():
        torch.testing.assert_close(t, 0.75 * t_before[name] + 0.25 * s[name].detach())


def test_last_layer_grads_cancelled():
    cfg = tiny_cfg("ibot_tiny_builtin", "method.patch_out_dim=64", "method.mask=random")
    method = get_method("ibot")(cfg, 10)
    loss, _ = method.training_step((random_crops(b=2), None), make_state())
    loss.backward()
    last = [p for p in method.student.head.last_layer.parameters() if p.requires_grad]
    assert last and all(p.grad is not None for p in last)
    method.cancel_last_layer_grads(make_state())
    assert all(p.grad is None for p in last)
    assert any(p.grad is not None for p in method.student.backbone.parameters())


# ------------------------------------------------------------------------------------- optimisation

def _train_steps(method, batch, steps, lr=3e-3):
    groups = method.param_groups(0.0)
    opt = torch.optim.AdamW(groups, lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        state = make_state(step=step, epoch=1, momentum=0.996, generator_seed=step)
        loss, _ = method.training_step(batch, state)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_after_optimizer_step(state)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method_name,opts", [
    ("dino", ["method.student_mask=random", "method.student_mask_mode=mask_token"]),
    ("dino", ["method.student_mask=random", "method.student_mask_mode=drop"]),
    ("dino", ["method.student_mask=attmask_high"]),
    ("dino", ["method.student_mask=none", "method.head_use_bn=false", "method.teacher_temp=0.07"]),
    ("ibot", ["method.mask=block", "method.block_min_patches=2", "method.patch_out_dim=64"]),
    ("ibot", ["method.mask=attmask_hint", "method.patch_out_dim=64"]),
])
def test_few_steps_lower_the_loss(method_name, opts, shapes_batch):
    recipe = "dino_tiny_builtin" if method_name == "dino" else "ibot_tiny_builtin"
    cfg = tiny_cfg(recipe, "method.warmup_teacher_temp_epochs=0", *opts)
    torch.manual_seed(0)
    method = get_method(method_name)(cfg, 10)
    losses = _train_steps(method, shapes_batch, steps=8)
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"{method_name} {opts}: loss did not go down: {losses}"
