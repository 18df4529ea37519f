"""Non-finite steps are skipped, counted and logged, and stop the run after N in a row; AMP policy per device."""
import copy
import logging

import pytest
import torch

from fastmask.engine.guard import NonFiniteError, NonFiniteGuard, amp_policy, grad_norm


def _step(model, opt, guard, x, step, scale=1.0):
    opt.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean() * scale
    loss.backward()
    norm = grad_norm(model.parameters())
    if guard.check(loss, norm, step=step):
        opt.step()
        return True
    guard.skip(opt)
    return False


def test_nan_loss_and_inf_grad_skip_the_step_without_touching_weights_or_optimizer_state(caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(max_consecutive=3)
    x = torch.randn(4, 5)
    assert _step(model, opt, guard, x, 0)
    before, opt_before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with caplog.at_level(logging.WARNING, logger="fastmask.engine.guard"):
        assert not _step(model, opt, guard, x, 1, scale=float("nan"))  # NaN loss
        x_inf = x.clone()
        x_inf[0, 0] = float("inf")
        assert not _step(model, opt, guard, x_inf, 2)  # inf input -> inf/NaN grads
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert opt.state_dict()["state"][0]["step"] == opt_before["state"][0]["step"] == 1
    assert all(p.grad is None for p in model.parameters())
    assert guard.metrics() == {"nonfinite_skipped": 2, "nonfinite_consecutive": 2}
    assert "step 1: non-finite loss nan" in caplog.text and "(2 in a row, 2 in total)" in caplog.text
    assert _step(model, opt, guard, x, 3)  # a good step resets the run of bad ones, not the total
    assert guard.metrics() == {"nonfinite_skipped": 2, "nonfinite_consecutive": 0}


def test_n_in_a_row_stops_with_a_clear_message_and_state_resumes():
    guard = NonFiniteGuard(max_consecutive=3)
    nan = torch.tensor(float("nan"))
    assert not guard.check(nan, step=10)
    assert not guard.check(torch.tensor(1.0), torch.tensor(float("inf")), step=11)
    with pytest.raises(NonFiniteError, match=r"step 12: 3 non-finite steps in a row \(loss nan; 3 skipped in total\)"
                                             r".*lower optim.lr"):
        guard.check(nan, step=12)
    resumed = NonFiniteGuard(3)
    resumed.load_state_dict({"skipped_total": 5, "consecutive": 2})
    with pytest.raises(NonFiniteError):
        resumed.check(nan)
    assert NonFiniteGuard(enabled=False).check(nan)
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(0)


def test_grad_norm_matches_clip_grad_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 2))
    model(torch.randn(3, 7)).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    torch.testing.assert_close(grad_norm(model.parameters()), expected)


def test_amp_policy_per_device(monkeypatch):
    cpu = amp_policy("cpu", "auto")
    assert cpu.dtype is None and not cpu.loss_scaling and not cpu.enabled
    assert amp_policy("cpu", "bf16").dtype == torch.bfloat16
    assert amp_policy("cpu", "off").dtype is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        amp_policy("cpu", "fp16")
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_policy("cpu", "half")
    # GPUs, by compute capability (no GPU needed: the policy only reads the capability and name).
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "FakeGPU")
    for cap, dtype, scaled in (((9, 0), torch.bfloat16, False), ((8, 0), torch.bfloat16, False),
                               ((7, 0), torch.float16, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, cap=cap: cap)
        p = amp_policy("cuda", "auto")
        assert (p.dtype, p.loss_scaling) == (dtype, scaled), cap
        assert amp_policy("cuda", "fp16").loss_scaling
    with pytest.raises(ValueError, match="no native bf16"):
        amp_policy("cuda", "bf16")  # capability 7.0 still patched in


# ------------------------------------------------------------------ in the training loop

def _trainer(tmp_path, *extra):
    from fastmask.config import load_config
    from fastmask.engine.loop import Trainer

    cfg = load_config(config="dino_tiny_builtin", overrides=[
        "data.batch_size=8", "data.num_workers=0", "data.num_local_crops=1", "model.depth=1",
        "method.out_dim=32", "method.head_hidden_dim=16", "method.head_bottleneck_dim=8", "log_every=1",
        "max_steps=5", "tensorboard=false", "progress_bar=false", "attn_images=0", f"output_dir={tmp_path}", *extra])
    return Trainer(cfg)


def _poison(trainer, bad_steps):
    """Feed NaN images at the given steps (as an overflow upstream would): loss and gradients go NaN."""
    step_fn = trainer.train_step

    def nan_like(obj):
        if isinstance(obj, torch.Tensor):
            return torch.full_like(obj, float("nan")) if obj.is_floating_point() else obj
        if isinstance(obj, (list, tuple)):
            return type(obj)(nan_like(o) for o in obj)
        return obj

    def train_step(batch, epoch):
        return step_fn(nan_like(batch) if trainer.step in bad_steps else batch, epoch)

    trainer.train_step = train_step


def test_loop_skips_nonfinite_steps_counts_and_logs_them(tmp_path):
    import json

    trainer = _trainer(tmp_path)
    _poison(trainer, {1, 2})
    snapshots = {}
    step_fn = trainer.train_step

    def train_step(batch, epoch):
        snapshots[trainer.step] = copy.deepcopy(trainer.method.state_dict())
        return step_fn(batch, epoch)

    trainer.train_step = train_step
    summary = trainer.fit()
    assert summary["step"] == 5 and trainer.guard.skipped_total == 2 and trainer.guard.consecutive == 0
    for k, v in snapshots[2].items():  # step 1 was skipped: nothing changed, the EMA teacher neither
        assert torch.equal(v, snapshots[1][k]), k
    assert any(not torch.equal(v, snapshots[3][k]) for k, v in snapshots[4].items())  # step 3 stepped
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = {r["step"]: r for r in records if "loss" in r and "event" not in r}
    assert steps[2]["nonfinite_skipped"] == 1 and steps[3]["nonfinite_skipped"] == 2
    assert steps[5]["nonfinite_skipped"] == 2 and steps[5]["nonfinite_consecutive"] == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["nonfinite"] == {"skipped_total": 2, "consecutive": 0}


def test_loop_stops_after_n_nonfinite_steps_in_a_row(tmp_path):
    trainer = _trainer(tmp_path, "nonfinite_max_consecutive=3")
    _poison(trainer, {0, 1, 2, 3, 4})
    try:
        with pytest.raises(NonFiniteError, match="step 2: 3 non-finite steps in a row"):
            trainer.fit()
    finally:
        trainer.close()  # fit stopped early: restore the ops' value checks it turned off
