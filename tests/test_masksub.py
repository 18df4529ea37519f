"""MaskSub (and DropSub / PathSub / the mask-token sub-branch): CPU tests on tiny ViTs.

What is checked: a few steps lower the loss; the sub-branch really runs on K = int(N/2) patch
tokens (plus CLS); the main branch's backward runs before the sub-branch's forward and the peak of
live saved activations stays near one branch; sequential and joint backward give the same
gradients; DropSub/PathSub switch the rates for the sub forward only; Mixup is reproducible.
"""
import numpy as np
import pytest
import torch

from fastmask import ops
from fastmask.config import ModelConfig, TrainConfig
from fastmask.flops import SavedActivationMeter
from fastmask.methods import get_method
from fastmask.methods.masksub import MaskSub, MaskSubConfig, sub_branch_regularisation
from fastmask.methods.supervised import (
    TargetMixer,
    classification_loss,
    self_distillation_loss,
)
from fastmask.models import create_vit
from helpers import image_batch, step_state

NUM_CLASSES = 4
NO_MIX = dict(mixup_alpha=0.0, cutmix_alpha=0.0)


def make_cfg(img_size=32, patch_size=8, **method):
    cfg = TrainConfig(model=ModelConfig(arch="vit_tiny", patch_size=patch_size, img_size=img_size,
                                        drop_path_rate=0.0, depth=2))
    cfg.method = MaskSubConfig(**method)
    return cfg


def make_method(img_size=32, patch_size=8, depth=2, drop_path_rate=0.0, seed=0, **method):
    torch.manual_seed(seed)
    cfg = make_cfg(img_size, patch_size, **method)
    student = create_vit("vit_tiny", patch_size=patch_size, img_size=img_size, num_classes=NUM_CLASSES,
                         depth=depth, drop_path_rate=drop_path_rate)
    return MaskSub(cfg, NUM_CLASSES, student=student)


def make_batch(n=8, img_size=32, seed=1):
    return image_batch(n, img_size, NUM_CLASSES, seed)


@torch.no_grad()
def eval_loss(method, images, labels, kind):
    method.student.eval()
    targets = method.mixer.smooth_one_hot(labels)
    loss = classification_loss(method.student(images), targets, kind)
    method.student.train()
    return float(loss)


@pytest.mark.parametrize("variant,loss", [("masksub", "bce"), ("masksub", "ce"), ("dropsub", "ce"),
                                          ("pathsub", "ce"), ("masktoken", "ce")])
def test_a_few_steps_lower_the_loss(variant, loss):
    method = make_method(variant=variant, loss=loss, **NO_MIX)
    images, labels = make_batch()
    opt = torch.optim.AdamW(method.student.parameters(), lr=2e-3)
    before = eval_loss(method, images, labels, loss)
    step_losses = []
    for step in range(6):
        total, metrics = method.training_step((images, labels), step_state(step))
        assert total.requires_grad is False  # manual backward: the returned loss is for logging
        assert set(metrics) >= {"loss_main", "loss_sub", "sub_tokens"}
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_losses.append(float(total))
    after = eval_loss(method, images, labels, loss)
    assert after < 0.8 * before, (before, after)
    assert step_losses[-1] < step_losses[0]


def test_registry_and_class_attributes():
    cls = get_method("masksub")
    assert cls is MaskSub
    assert cls.pipeline == "supervised" and cls.manual_backward is True
    assert cls.Config().mask_ratio == 0.5 and cls.Config().main_weight == cls.Config().sub_weight == 0.5


@pytest.mark.parametrize("img_size,patch_size", [(32, 8), (40, 8)])  # N = 16 and N = 25 (odd)
def test_sub_branch_runs_on_half_the_tokens_after_main_backward(img_size, patch_size):
    method = make_method(img_size=img_size, patch_size=patch_size, **NO_MIX)
    N = method.student.num_patches
    events = []
    first_block = method.student.blocks[0]
    first_block.register_forward_hook(lambda mod, inp, out: events.append(("forward", inp[0].shape[1])))
    first_block.register_full_backward_hook(lambda mod, gin, gout: events.append(("backward", None)))
    images, labels = make_batch(img_size=img_size)
    _, metrics = method.training_step((images, labels), step_state())
    K = int(N / 2)
    # main forward on CLS + N, its backward, then the sub forward on CLS + K and its backward
    assert events == [("forward", 1 + N), ("backward", None), ("forward", 1 + K), ("backward", None)]
    assert metrics["sub_tokens"] == K


def random_keep_ids(batch, num_patches, mask_ratio, *, generator, device):
    return ops.random_keep(batch, num_patches, mask_ratio, generator=generator, device=device).ids_keep


def test_random_keep_ids_are_sorted_unique_and_reproducible():
    ids = random_keep_ids(3, 25, 0.5, generator=torch.Generator().manual_seed(5), device="cpu")
    again = random_keep_ids(3, 25, 0.5, generator=torch.Generator().manual_seed(5), device="cpu")
    other = random_keep_ids(3, 25, 0.5, generator=torch.Generator().manual_seed(6), device="cpu")
    assert ids.shape == (3, 12) and ids.dtype == torch.int64
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert bool((ids[:, 1:] > ids[:, :-1]).all())
    assert int(ids.min()) >= 0 and int(ids.max()) < 25


def test_saved_activation_meter_counts_what_autograd_keeps():
    w = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(4, 6)
    meter = SavedActivationMeter(exclude=[w])
    with meter.track():
        h = torch.relu(x @ w)  # saves x (4x6) for w's grad (w is excluded) and relu's output (4x5)
        assert meter.live == (4 * 6 + 4 * 5) * 4
        h.sum().backward()
    assert meter.peak == (4 * 6 + 4 * 5) * 4
    assert meter.live == 0  # freed by backward


def test_peak_saved_activations_stay_near_one_branch():
    images, labels = make_batch(n=8, img_size=64)  # N = 64 patches at patch 8

    def peak_of(sequential):
        method = make_method(img_size=64, sequential_backward=sequential, **NO_MIX)
        meter = SavedActivationMeter(exclude=method.student.parameters())
        with meter.track():
            method.training_step((images, labels), step_state())
        return meter.peak, meter.live

    def peak_main_only():
        method = make_method(img_size=64, **NO_MIX)
        meter = SavedActivationMeter(exclude=method.student.parameters())
        with meter.track():
            images_, targets = method.mixer(images, labels)
            classification_loss(method.student(images_), targets, "bce").backward()
        return meter.peak

    one_branch = peak_main_only()
    sequential, left_seq = peak_of(True)
    joint, left_joint = peak_of(False)
    assert left_seq == 0 and left_joint == 0  # every saved activation was freed by the end
    # Sequential: the sub-branch's graph (K = N/2 tokens) is built after the main one is freed.
    assert sequential <= 1.02 * one_branch, (sequential, one_branch)
    # Both graphs alive: main plus a sub-branch of about half its size.
    assert joint >= 1.3 * sequential, (joint, sequential)


def test_sequential_and_joint_backward_give_the_same_gradients():
    images, labels = make_batch()
    grads = []
    for sequential in (True, False):
        method = make_method(sequential_backward=sequential, **NO_MIX)
        total, _ = method.training_step((images, labels), step_state(seed=3))
        grads.append({n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_sub_loss_targets_the_detached_main_prediction():
    method = make_method(variant="masksub", loss="ce", **NO_MIX)
    images, labels = make_batch()
    captured = {}

    def backward(loss):
        captured.setdefault("parts", []).append(float(loss.detach()))
        loss.backward()

    _, metrics = method.training_step((images, labels), step_state(seed=4, backward=backward))
    # recompute both halves independently with the same masking draw
    student = method.student
    with torch.no_grad():
        targets = method.mixer.smooth_one_hot(labels)
        main = student(images)
        ids = random_keep_ids(images.shape[0], student.num_patches, 0.5,
                              generator=torch.Generator().manual_seed(4), device="cpu")
        sub = student(images, ids_keep=ids)
        expected_sub = -(torch.softmax(main, -1) * torch.log_softmax(sub, -1)).sum(-1).mean()
    # the weights changed only through grads (no optimizer step was taken), so the outputs match
    torch.testing.assert_close(metrics["loss_main"], classification_loss(main, targets, "ce"))
    torch.testing.assert_close(metrics["loss_sub"], expected_sub)
    assert captured["parts"] == pytest.approx([0.5 * float(metrics["loss_main"]), 0.5 * float(metrics["loss_sub"])])


def test_bce_self_distillation_uses_sigmoid_targets():
    sub = torch.randn(5, 7, requires_grad=True)
    main = torch.randn(5, 7, requires_grad=True)
    loss = self_distillation_loss(sub, main, "bce")
    expected = torch.nn.functional.binary_cross_entropy_with_logits(sub, torch.sigmoid(main.detach()))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert main.grad is None  # the main branch only provides the (detached) target


@pytest.mark.parametrize("variant", ["dropsub", "pathsub"])
def test_dropsub_pathsub_switch_rates_for_the_sub_forward_only(variant):
    method = make_method(variant=variant, sub_drop_rate=0.3, sub_drop_path_rate=0.4, **NO_MIX)
    block = method.student.blocks[1]
    seen = []

    def record(mod, inp, out):
        from timm.layers import DropPath

        dp = block.drop_path1
        seen.append((block.attn.proj_drop.p, block.mlp.drop1.p, block.mlp.drop2.p,
                     dp.drop_prob if isinstance(dp, DropPath) else None))

    block.register_forward_hook(record)
    before = (type(block.drop_path1), type(block.drop_path2), block.attn.proj_drop.p, block.mlp.drop2.p)
    method.training_step(make_batch(), step_state())
    assert seen[0] == (0.0, 0.0, 0.0, None)  # main branch: the model's own rates (none here)
    if variant == "dropsub":
        assert seen[1] == (0.3, 0.3, 0.3, None)
    else:
        assert seen[1] == (0.0, 0.0, 0.0, 0.4)
    after = (type(block.drop_path1), type(block.drop_path2), block.attn.proj_drop.p, block.mlp.drop2.p)
    assert after == before


def test_regularisation_context_restores_on_error():
    model = create_vit("vit_tiny", patch_size=8, img_size=32, num_classes=2, depth=2, drop_path_rate=0.2)
    old = [(type(b.drop_path1), getattr(b.drop_path1, "drop_prob", None), b.mlp.drop1.p) for b in model.blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with sub_branch_regularisation(model, drop_rate=0.5, drop_path_rate=0.6):
            assert all(b.drop_path1.drop_prob == 0.6 and b.mlp.drop1.p == 0.5 for b in model.blocks)
            raise RuntimeError("boom")
    new = [(type(b.drop_path1), getattr(b.drop_path1, "drop_prob", None), b.mlp.drop1.p) for b in model.blocks]
    assert new == old


def test_mixup_is_reproducible_and_leaves_global_state_and_batch_alone():
    cfg = MaskSubConfig(loss="ce", label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
    mixer = TargetMixer(cfg, NUM_CLASSES)
    images, labels = make_batch()
    original = images.clone()
    np.random.seed(123)
    np_state = np.random.get_state()[1].copy()
    a = mixer(images, labels, torch.Generator().manual_seed(9))
    b = mixer(images, labels, torch.Generator().manual_seed(9))
    assert torch.equal(images, original)  # timm mixes in place: the caller's batch must not change
    assert np.array_equal(np.random.get_state()[1], np_state)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert a[1].shape == (8, NUM_CLASSES)
    torch.testing.assert_close(a[1].sum(-1), torch.ones(8))  # mixed, smoothed targets are distributions


def test_bce_targets_are_binarised_like_deit3():
    cfg = MaskSubConfig(loss="bce", label_smoothing=0.0, mixup_alpha=0.8, cutmix_alpha=0.0, mixup_prob=1.0)
    mixer = TargetMixer(cfg, NUM_CLASSES)
    images, labels = make_batch()
    _, targets = mixer(images, labels, torch.Generator().manual_seed(2))
    assert set(targets.unique().tolist()) <= {0.0, 1.0}
    assert bool((targets.sum(-1) >= 1).all())


@pytest.mark.parametrize("bad", [dict(variant="nope"), dict(mask_ratio=1.0), dict(mask_ratio=0.0),
                                 dict(loss="mse"), dict(sub_drop_rate=1.0), dict(mixup_mode="x")])
def test_bad_config_raises_value_error(bad):
    with pytest.raises(ValueError):
        MaskSubConfig(**bad)


def test_odd_batch_with_mixup_is_a_clear_error():
    method = make_method(mixup_alpha=0.8)
    with pytest.raises(ValueError, match="even batch"):
        method.training_step(make_batch(n=5), step_state())


@pytest.mark.gpu
def test_cuda_peak_memory_sequential_backward_is_one_branch(monkeypatch):
    """On a GPU with the fused kernels: the allocator's peak during a MaskSub step stays near the
    plain recipe's and well below the both-graphs-alive baseline (ViT-S/16, 224 px, bf16)."""
    monkeypatch.delenv("FASTMASK_BACKEND", raising=False)  # fused kernels, not the reference
    device = torch.device("cuda")
    images = torch.randn(64, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (64,), device=device)

    def extra_peak(kind):
        torch.manual_seed(0)
        cfg = TrainConfig(model=ModelConfig(arch="vit_small", patch_size=16, img_size=224, drop_path_rate=0.0))
        cfg.method = MaskSubConfig(sequential_backward=(kind != "joint"), **NO_MIX)
        student = create_vit("vit_small", patch_size=16, img_size=224, num_classes=1000).to(device)
        method = MaskSub(cfg, 1000, student=student).to(device)
        state = step_state(device=device, amp_dtype=torch.bfloat16)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if kind == "plain":
                    x, targets = method.mixer(images, labels)
                    classification_loss(method.student(x), targets, "bce").backward()
                else:
                    method.training_step((images, labels), state)
            method.student.zero_grad(set_to_none=False)  # keep the grad buffers: same baseline for all

        step()  # allocate the gradient buffers once
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain, sequential, joint = extra_peak("plain"), extra_peak("sequential"), extra_peak("joint")
    assert sequential <= 1.1 * plain, (sequential, plain)
    assert sequential <= 0.8 * joint, (sequential, joint)


@pytest.mark.parametrize("recipe,arch,img", [("masksub_deit3_vits", "vit_small", 224),
                                             ("masksub_deit3_vitb", "vit_base", 192),
                                             ("masksub_tiny_builtin", "vit_tiny", 32)])
def test_recipes_load_and_validate(recipe, arch, img):
    from fastmask.config import load_config

    cfg = load_config(config=recipe)
    assert cfg.method_name == "masksub" and isinstance(cfg.method, MaskSubConfig)
    assert cfg.model.arch == arch and cfg.model.img_size == img
    assert cfg.method.variant == "masksub" and cfg.method.mask_ratio == 0.5
    if recipe.startswith("masksub_deit3"):
        assert cfg.method.loss == "bce" and cfg.method.layer_scale_init == 1e-4 and cfg.data.three_augment
    override = load_config(config=recipe, overrides=["method.variant=pathsub", "method.sub_drop_path_rate=0.3"])
    assert override.method.variant == "pathsub" and override.method.sub_drop_path_rate == 0.3
    with pytest.raises(ValueError, match="variant"):
        load_config(config=recipe, overrides=["method.variant=maskedsub"])


def test_sub_weight_zero_is_plain_supervised_training_without_a_sub_forward():
    images, labels = make_batch()
    method = make_method(main_weight=1.0, sub_weight=0.0, loss="ce", **NO_MIX)
    tokens = []
    method.student.blocks[0].register_forward_hook(lambda mod, inp, out: tokens.append(inp[0].shape[1]))
    loss, metrics = method.training_step((images, labels), step_state())
    assert tokens == [17] and "loss_sub" not in metrics  # one full forward, no sub-branch
    grads = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
    reference = make_method(main_weight=1.0, sub_weight=0.0, loss="ce", **NO_MIX)
    ref = classification_loss(reference.student(images), reference.mixer.smooth_one_hot(labels), "ce")
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    for n, p in reference.student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_classifier_accuracy_top1_top5_on_known_logits():
    from fastmask.methods.supervised import classifier_accuracy

    class Fixed(torch.nn.Module):  # logits = the input's first row of numbers, so the answer is known
        def forward(self, x):
            return x[:, 0, 0, :]

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 10)
    labels = torch.randint(0, 10, (2, 7))
    batches = [(logits[i][:, None, None, :], labels[i]) for i in range(2)]
    model = Fixed().train()
    out = classifier_accuracy(model, batches, torch.device("cpu"))
    flat, y = logits.reshape(14, 10), labels.reshape(14)
    top1 = 100.0 * (flat.argmax(-1) == y).float().mean().item()
    top5 = 100.0 * (flat.topk(5, -1).indices == y[:, None]).any(-1).float().mean().item()
    assert out == pytest.approx({"val_top1": top1, "val_top5": top5}) and model.training
    method = make_method()
    assert set(method.evaluate_classifier(batches[:0] or [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))],
                                          torch.device("cpu"))) == {"val_top1"}
