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
