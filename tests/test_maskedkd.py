"""MaskedKD and the FLOP counters: CPU tests on small ViTs.

What is checked: a few steps lower the loss (soft and hard distillation); the teacher's kept tokens
are exactly the top-k of the student's last-layer CLS map (CLS kept); ``teacher_keep = N`` is plain
KD (same loss, same gradients); the teacher is frozen; at 98 of 196 patches a ViT-B teacher spends
at most 52% of its full FLOPs (counted by FlopCounterMode), and the per-step hook meter reports
exactly what FlopCounterMode counts.
"""
import pytest
import torch
import torch.nn.functional as F

from fastmask.config import ModelConfig, TeacherConfig, TrainConfig
from fastmask.flops import FlopMeter, count_flops
from fastmask.methods import get_method
from fastmask.methods.maskedkd import MaskedKD, MaskedKDConfig, resolve_keep
from fastmask.methods.supervised import hard_distillation_loss, soft_distillation_loss
from fastmask.models import create_vit
from helpers import image_batch, step_state

NUM_CLASSES = 4
NO_MIX = dict(mixup_alpha=0.0, cutmix_alpha=0.0)


def make_method(img_size=32, patch_size=8, teacher_keep=8, student_depth=2, teacher_arch="vit_small",
                teacher_depth=2, seed=0, **method):
    torch.manual_seed(seed)
    cfg = TrainConfig(model=ModelConfig(arch="vit_tiny", patch_size=patch_size, img_size=img_size,
                                        drop_path_rate=0.0, depth=student_depth))
    cfg.method = MaskedKDConfig(teacher_keep=teacher_keep, **method)
    student = create_vit("vit_tiny", patch_size=patch_size, img_size=img_size, num_classes=NUM_CLASSES,
                         depth=student_depth)
    teacher = create_vit(teacher_arch, patch_size=patch_size, img_size=img_size, num_classes=NUM_CLASSES,
                         depth=teacher_depth)
    return MaskedKD(cfg, NUM_CLASSES, student=student, teacher=teacher)


def make_batch(n=8, img_size=32, seed=1):
    return image_batch(n, img_size, NUM_CLASSES, seed)


def record_teacher_calls(method):
    calls = []
    method.teacher.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs.get("ids_keep")), with_kwargs=True
    )
    lengths = []
    method.teacher.blocks[0].register_forward_hook(lambda mod, inp, out: lengths.append(inp[0].shape[1]))
    return calls, lengths


@pytest.mark.parametrize("distillation", ["soft", "hard"])
def test_a_few_steps_lower_the_loss(distillation):
    method = make_method(distillation=distillation, label_smoothing=0.0, **NO_MIX)
    images, labels = make_batch()
    opt = torch.optim.AdamW(method.student.parameters(), lr=2e-3)
    losses = []
    for step in range(6):
        loss, metrics = method.training_step((images, labels), step_state(step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in method.teacher.parameters())


def test_registry_and_class_attributes():
    cls = get_method("maskedkd")
    assert cls is MaskedKD and cls.pipeline == "supervised" and cls.manual_backward is False
    default = cls.Config()
    assert default.teacher_keep == 98 and default.alpha == 0.5 and default.tau == 1.0


@pytest.mark.parametrize("keep", [1, 5, 15])  # N = 16: K = 1, K = 5, K = N - 1
def test_kept_tokens_are_the_top_k_of_the_student_cls_map(keep):
    method = make_method(teacher_keep=keep, **NO_MIX)
    images, labels = make_batch()
    calls, lengths = record_teacher_calls(method)
    _, metrics = method.training_step((images, labels), step_state())
    with torch.no_grad():  # the student is deterministic (no dropout/drop-path): same map again
        _, cls_attn = method.student(images, return_cls_attn=True)
    ids = calls[0]
    assert ids.shape == (8, keep)
    assert bool((ids[:, 1:] > ids[:, :-1]).all())  # ascending, unique
    expected = torch.sort(torch.topk(cls_attn, keep, dim=1).indices, dim=1).values
    assert torch.equal(ids, expected)
    # the kept patches really are the most attended ones: every kept score >= every dropped score
    kept_scores = torch.gather(cls_attn, 1, ids)
    dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter_(1, ids, False)
    lowest_kept = kept_scores.min(1).values
    highest_dropped = cls_attn.masked_fill(~dropped, float("-inf")).max(1).values
    assert bool((lowest_kept >= highest_dropped).all())
    assert lengths[0] == 1 + keep  # the teacher ran on CLS + the kept patches only
    assert metrics["teacher_tokens"] == keep


def test_teacher_keep_n_is_plain_kd():
    images, labels = make_batch()
    method = make_method(teacher_keep=16, **NO_MIX)  # N = 16
    calls, lengths = record_teacher_calls(method)
    loss, metrics = method.training_step((images, labels), step_state())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
    assert calls and all(c is None for c in calls)  # no ids: the teacher saw every token
    assert lengths[0] == 17
    assert metrics["teacher_flops_ratio"] == pytest.approx(1.0)

    # plain DeiT soft KD written out by hand, on a fresh copy of the same weights
    reference = make_method(teacher_keep=16, **NO_MIX)
    student, teacher = reference.student, reference.teacher
    logits = student(images)
    with torch.no_grad():
        t_logits = teacher(images)
    targets = F.one_hot(labels, NUM_CLASSES).float() * 0.9 + 0.1 / NUM_CLASSES
    ce = torch.sum(-targets * F.log_softmax(logits, -1), -1).mean()
    kd = F.kl_div(F.log_softmax(logits, -1), F.softmax(t_logits, -1), reduction="batchmean")
    ref_loss = 0.5 * ce + 0.5 * kd
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    for n, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_token_dropping_teacher_with_all_ids_equals_the_full_teacher():
    teacher = create_vit("vit_small", patch_size=8, img_size=32, num_classes=NUM_CLASSES, depth=2).eval()
    images, _ = make_batch()
    all_ids = torch.arange(16).expand(8, 16).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(teacher(images, ids_keep=all_ids), teacher(images), rtol=1e-5, atol=1e-5)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    method = make_method(**NO_MIX)
    method.train()
    assert method.student.training and not method.teacher.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    trainable = {id(p) for g in method.param_groups(0.05) for p in g["params"]}
    assert trainable and not trainable & {id(p) for p in method.teacher.parameters()}


def test_soft_and_hard_distillation_losses():
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5)
    tau = 2.0
    p_t = F.softmax(t / tau, -1)
    expected = (p_t * (torch.log(p_t) - F.log_softmax(s / tau, -1))).sum(-1).mean() * tau * tau
    torch.testing.assert_close(soft_distillation_loss(s, t, tau), expected)
    torch.testing.assert_close(hard_distillation_loss(s, t), F.cross_entropy(s, t.argmax(-1)))
    assert float(soft_distillation_loss(t, t, tau)) == pytest.approx(0.0, abs=1e-6)


def test_resolve_keep_counts_and_fractions():
    assert resolve_keep(98, 196) == 98
    assert resolve_keep(0.5, 196) == 98
    assert resolve_keep(0.75, 196) == 147
    assert resolve_keep(500, 196) == 196
    assert resolve_keep(0.001, 196) == 1


@pytest.mark.parametrize("bad", [dict(teacher_keep=98.5), dict(teacher_keep=0), dict(alpha=1.5),
                                 dict(tau=0.0), dict(distillation="medium"), dict(flop_counter="guess")])
def test_bad_config_raises_value_error(bad):
    with pytest.raises(ValueError):
        MaskedKDConfig(**bad)


def test_teacher_on_another_patch_grid_is_rejected():
    cfg = TrainConfig(model=ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.0))
    cfg.method = MaskedKDConfig(**NO_MIX)
    student = create_vit("vit_tiny", patch_size=8, img_size=32, num_classes=NUM_CLASSES, depth=1)
    teacher = create_vit("vit_tiny", patch_size=16, img_size=32, num_classes=NUM_CLASSES, depth=1)
    with pytest.raises(ValueError, match="patch grid"):
        MaskedKD(cfg, NUM_CLASSES, student=student, teacher=teacher)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b_224():
    """A ViT-B/16 at 224 px (196 patches), depth cut to 4 blocks to keep the CPU test short."""
    torch.manual_seed(0)
    return create_vit("vit_base", patch_size=16, img_size=224, num_classes=10, depth=4).eval()


def test_teacher_flops_at_98_of_196_are_at_most_52_percent(vit_b_224):
    images = torch.randn(1, 3, 224, 224)
    cls_attn = torch.rand(1, 196)
    ids = torch.sort(torch.topk(cls_attn, 98, dim=1).indices, dim=1).values
    with torch.no_grad():
        _, full = count_flops(vit_b_224, images)
        _, kept = count_flops(vit_b_224, images, ids_keep=ids)
    ratio = kept / full
    assert ratio <= 0.52, ratio
    assert ratio >= 0.45  # the patch embedding still runs on all 196 patches: not below half by much


def test_hook_meter_counts_exactly_what_flop_counter_mode_counts(vit_b_224):
    images = torch.randn(2, 3, 224, 224)
    meter = FlopMeter(vit_b_224)
    for keep in (None, 147, 49):
        ids = None if keep is None else torch.sort(torch.randperm(196)[:keep]).values.expand(2, keep).contiguous()
        with torch.no_grad():
            _, counted = count_flops(vit_b_224, images, ids_keep=ids)
            with meter.measure() as m:
                vit_b_224(images, ids_keep=ids)
        assert m.flops == counted, (keep, m.flops, counted, m.per_module)
        assert m.per_module["attention"] > 0 and m.per_module["conv"] > 0
    meter.remove()
    with meter.measure() as m:
        with torch.no_grad():
            vit_b_224(images[:1])
    assert m.flops == 0  # hooks removed: nothing counted


def test_method_logs_the_counted_teacher_flops():
    # Student and teacher at 224/16 (N = 196), both one block deep; teacher keeps 98 patches.
    method = make_method(img_size=224, patch_size=16, teacher_keep=98, student_depth=1, teacher_depth=1,
                         **NO_MIX)
    images, labels = make_batch(n=2, img_size=224)
    _, metrics = method.training_step((images, labels), step_state())
    with torch.no_grad():
        _, cls_attn = method.student(images, return_cls_attn=True)
        ids = torch.sort(torch.topk(cls_attn, 98, dim=1).indices, dim=1).values
        _, spent = count_flops(method.teacher, images, ids_keep=ids)
        _, full = count_flops(method.teacher, images)
    assert metrics["teacher_gflops"] == pytest.approx(spent / 1e9)
    assert metrics["teacher_gflops_full"] == pytest.approx(full / 1e9)
    assert metrics["teacher_flops_ratio"] == pytest.approx(spent / full)
    assert metrics["teacher_flops_ratio"] < 0.6


def test_dispatch_counter_agrees_with_hooks():
    a = make_method(teacher_keep=6, flop_counter="hooks", **NO_MIX)
    b = make_method(teacher_keep=6, flop_counter="dispatch", **NO_MIX)
    images, labels = make_batch(n=2)
    _, ma = a.training_step((images, labels), step_state())
    _, mb = b.training_step((images, labels), step_state())
    assert ma["teacher_gflops"] == pytest.approx(mb["teacher_gflops"])
    assert ma["teacher_gflops_full"] == pytest.approx(mb["teacher_gflops_full"])


@pytest.mark.gpu
def test_cuda_step_with_fused_attention_logs_counted_flops(monkeypatch):
    """On a GPU the attention runs in the fused kernel, which FlopCounterMode cannot see; the hook
    meter still reports what FlopCounterMode counts on the reference path.  DeiT-S <- ViT-B, 98/196."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(arch="vit_small", patch_size=16, img_size=224, drop_path_rate=0.1))
    cfg.method = MaskedKDConfig(teacher_keep=98)
    student = create_vit("vit_small", patch_size=16, img_size=224, num_classes=1000, drop_path_rate=0.1)
    teacher = create_vit("vit_base", patch_size=16, img_size=224, num_classes=1000)
    method = MaskedKD(cfg, 1000, student=student, teacher=teacher).to(device).train()
    images = torch.randn(32, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (32,), device=device)
    state = step_state(device=device, amp_dtype=torch.bfloat16)
    monkeypatch.delenv("FASTMASK_BACKEND", raising=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, metrics = method.training_step((images, labels), state)
    loss.backward()
    assert torch.isfinite(loss)
    assert metrics["teacher_tokens"] == 98
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    ids = torch.arange(98, device=device).expand(32, 98).contiguous()  # any 98 patches cost the same
    with torch.no_grad():
        _, spent = count_flops(method.teacher, images, ids_keep=ids)
        _, full = count_flops(method.teacher, images)
    assert metrics["teacher_gflops"] == pytest.approx(spent / 1e9)
    assert metrics["teacher_gflops_full"] == pytest.approx(full / 1e9)
    assert metrics["teacher_flops_ratio"] <= 0.52


@pytest.mark.parametrize("recipe,keep", [("maskedkd_deits_deitb", 98), ("maskedkd_tiny_builtin", 0.5)])
def test_recipes_load_and_validate(recipe, keep, tmp_path):
    from fastmask.config import load_config

    cfg = load_config(config=recipe)
    assert cfg.method_name == "maskedkd" and isinstance(cfg.method, MaskedKDConfig)
    assert cfg.method.teacher_keep == keep and cfg.method.distillation == "soft" and cfg.method.alpha == 0.5
    if recipe == "maskedkd_deits_deitb":
        assert (cfg.model.arch, cfg.method.teacher.arch, cfg.model.img_size) == ("vit_small", "vit_base", 224)
        assert resolve_keep(cfg.method.teacher_keep, 196) == 98
    with pytest.raises(ValueError, match="method.teacher.checkpoint: file not found"):
        load_config(config=recipe, overrides=[f"method.teacher.checkpoint={tmp_path / 'missing.pth'}"])
    with pytest.raises(ValueError, match="must match"):
        load_config(config=recipe, overrides=["method.teacher.patch_size=32"])


def test_teacher_loads_from_a_local_deit_checkpoint(tmp_path):
    import timm

    torch.manual_seed(3)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=NUM_CLASSES).eval()
    path = tmp_path / "deit_small.pth"
    torch.save({"model": deit.state_dict()}, path)  # DeiT's checkpoint layout
    cfg = TrainConfig(model=ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.0, depth=1))
    cfg.method = MaskedKDConfig(teacher=TeacherConfig(arch="vit_small", depth=2, checkpoint=str(path)),
                                teacher_keep=16, **NO_MIX)
    MaskedKD.check_config(cfg)
    method = MaskedKD(cfg, NUM_CLASSES)
    images, _ = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(method.teacher(images), deit(images), rtol=1e-4, atol=1e-4)
    assert len(method.student.blocks) == 1 and not method.teacher.training


def test_random_teacher_selection_keeps_k_random_patches():
    method = make_method(teacher_keep=5, teacher_select="random", **NO_MIX)  # N = 16
    images, labels = make_batch()
    calls, lengths = record_teacher_calls(method)
    method.training_step((images, labels), step_state(seed=3))
    method.training_step((images, labels), step_state(seed=3))
    method.training_step((images, labels), step_state(seed=4))
    calls = [c for c in calls if c is not None]  # drop the one full-input FLOP count
    ids = calls[0]
    assert ids.shape == (8, 5) and bool((ids[:, 1:] > ids[:, :-1]).all()) and int(ids.max()) < 16
    assert lengths[0] == 1 + 5
    assert torch.equal(calls[0], calls[1]) and not torch.equal(calls[0], calls[2])  # the step's generator
    with torch.no_grad():
        _, cls_attn = method.student(images, return_cls_attn=True)
    top = torch.sort(torch.topk(cls_attn, 5, dim=1).indices, dim=1).values
    assert not torch.equal(ids, top)
    with pytest.raises(ValueError, match="teacher_select"):
        MaskedKDConfig(teacher_select="lowest")


class _Batches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_evaluate_classifier_measures_student_and_the_teacher_once():
    method = make_method(**NO_MIX)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (6,), generator=g))
               for _ in range(3)]
    teacher_calls = []
    method.teacher.register_forward_pre_hook(lambda mod, args: teacher_calls.append(1))
    method.train()
    first = method.evaluate_classifier(_Batches(batches), torch.device("cpu"))
    assert len(teacher_calls) == 3
    second = method.evaluate_classifier(_Batches(batches), torch.device("cpu"))
    assert len(teacher_calls) == 3  # frozen teacher: measured once
    assert first == second and method.student.training and not method.teacher.training
    with torch.no_grad():
        method.student.eval()
        s_pred = torch.cat([method.student(x).argmax(-1) for x, _ in batches])
        t_pred = torch.cat([method.teacher(x).argmax(-1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert first["val_top1"] == pytest.approx(100.0 * (s_pred == labels).float().mean().item())
    assert first["teacher_val_top1"] == pytest.approx(100.0 * (t_pred == labels).float().mean().item())
    assert "val_top5" not in first  # 4 classes: top-5 is meaningless
