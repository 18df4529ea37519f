"""Optional W&B logging: records forwarded at their step, a clear error without the package."""
import sys
import types

import pytest
import torch

from fastmask.engine.loggers import WandbLogger, wandb_available


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished, self.id = kwargs, [], False, "run123"

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: _FakeRun(**kw)
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_records_are_forwarded_at_their_step(fake_wandb, tmp_path):
    log = WandbLogger(project="p", config={"optim": {"lr": 1e-3}}, dir=str(tmp_path / "wb"), mode="offline",
                      resume_id="abc")
    assert log.run.kwargs["mode"] == "offline" and log.run.kwargs["config"] == {"optim": {"lr": 1e-3}}
    assert log.run.kwargs["id"] == "abc" and log.run.kwargs["resume"] == "allow" and (tmp_path / "wb").is_dir()
    sent = log.log({"step": 7, "epoch": 0.5, "loss": torch.tensor(2.5), "lr": 1e-3, "grad_norm": float("nan"),
                    "amp": True, "backend": "torch"})
    assert sent == {"epoch": 0.5, "loss": 2.5, "lr": 1e-3}
    log.log({"event": "eval", "step": 9, "knn_top1": 56.0})
    assert log.run.logged == [(7, sent), (9, {"knn_top1": 56.0})]
    log.close()
    log.close()
    assert log.run.finished and log.run_id == "run123"
    with pytest.raises(RuntimeError, match="after close"):
        log.log({"step": 1, "loss": 1.0})


def test_absent_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert not wandb_available()
    with pytest.raises(ImportError, match=r"wandb package is not installed: `pip install wandb`"):
        WandbLogger(project="p")


def test_bad_options(fake_wandb):
    with pytest.raises(ValueError, match="mode must be one of"):
        WandbLogger(mode="cloud")
    with pytest.raises(ValueError, match="project"):
        WandbLogger(project="")


def test_trainer_logs_to_wandb_when_asked(fake_wandb, tmp_path):
    from fastmask.config import load_config
    from fastmask.engine.loop import Trainer

    runs = []
    fake_wandb.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    cfg = load_config(config="dino_tiny_builtin", overrides=[
        "data.batch_size=8", "data.num_workers=0", "data.num_local_crops=1", "model.depth=1", "method.out_dim=32",
        "method.head_hidden_dim=16", "method.head_bottleneck_dim=8", "log_every=1", "max_steps=2",
        "tensorboard=false", "progress_bar=false", "attn_images=0", f"output_dir={tmp_path}", "wandb=true",
        "wandb_mode=offline", "wandb_project=fm-test"])
    Trainer(cfg).fit()
    (run,) = runs
    assert run.kwargs["project"] == "fm-test" and run.kwargs["mode"] == "offline" and run.finished
    assert run.kwargs["config"]["method"] == "dino"
    steps = [s for s, d in run.logged if "loss" in d]
    assert steps == [1, 2] and all("lr" in d and "nonfinite_skipped" in d for s, d in run.logged if "loss" in d)


def test_wandb_config_is_checked():
    from fastmask.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="wandb_mode"):
        load_config(overrides=["wandb_mode=cloud"])
