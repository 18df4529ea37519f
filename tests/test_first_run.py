"""A new user's first runs: every built-in recipe with ``epochs=1`` (the warm-up shortened with a
notice), and the tiny distillation recipes' ``teacher.checkpoint: auto`` (trained once, cached,
reused, its weights really loaded).  Tiny overrides (1 block, 30 images) keep each run to seconds."""
import glob
import os

import pytest
import torch

from fastmask import train as train_cli
from fastmask.config import RECIPE_DIR, load_config

BUILTIN_RECIPES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(RECIPE_DIR, "*_builtin.yaml")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("first_run_cache"))


def _tiny(recipe, out, cache, *extra):
    over = ["--config", recipe, "--output-dir", str(out), "epochs=1", "data.data=builtin:shapes,train=3,val=2",
            "data.batch_size=8", "data.num_workers=0", f"data.cache_dir={cache}", "model.depth=1",
            "model.embed_dim=24", "model.num_heads=2", "progress_bar=false", "tensorboard=false", "attn_images=1",
            "knn_k=5", "log_every=1"]
    if recipe.startswith(("maskedkd", "maskdistill")):
        over += ["method.teacher.depth=1", "method.teacher.embed_dim=24", "method.teacher.num_heads=2",
                 "method.teacher.auto_epochs=1"]
    return over + list(extra)


def test_every_builtin_recipe_is_listed():
    assert BUILTIN_RECIPES == ["dino_tiny_builtin", "ibot_tiny_builtin", "maskdistill_tiny_builtin",
                               "maskedkd_tiny_builtin", "masksub_tiny_builtin"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", BUILTIN_RECIPES)
def test_builtin_recipe_runs_one_epoch(recipe, tmp_path, cache_dir, capsys):
    warmup = load_config(config=recipe).optim.warmup_epochs
    code = train_cli.main(_tiny(recipe, tmp_path / "run", cache_dir))
    text = capsys.readouterr()
    assert code == 0, text.err[-2000:]
    if warmup > 1:
        assert f"optim.warmup_epochs={warmup:g} does not fit epochs=1; warm-up shortened to 0.5 epochs" in text.out
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] == ckpt["steps_per_epoch"] == 3
    assert "knn_top1" in ckpt["last_eval"]
    assert (tmp_path / "run" / "attention" / "epoch0001.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["maskedkd_tiny_builtin", "maskdistill_tiny_builtin"])
def test_auto_teacher_is_trained_once_cached_and_loaded(recipe, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert load_config(config=recipe).method.teacher.checkpoint == "auto"
    assert train_cli.main(_tiny(recipe, tmp_path / "a", cache)) == 0
    first = capsys.readouterr().out
    assert "method.teacher.checkpoint=auto: training the teacher once" in first
    cached = glob.glob(str(cache / "teachers" / "*" / "checkpoint.pt"))
    assert len(cached) == 1 and f"teacher: " in first and cached[0] in first
    assert "val top-1" in first

    assert train_cli.main(_tiny(recipe, tmp_path / "b", cache)) == 0  # same settings: the cache is reused
    second = capsys.readouterr().out
    assert "training the teacher once" not in second and cached[0] in second
    assert len(glob.glob(str(cache / "teachers" / "*" / "checkpoint.pt"))) == 1

    # The run's frozen teacher holds the cached teacher's weights (not a random init).
    teacher_sd = torch.load(cached[0], weights_only=False)["method"]
    run_sd = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["method"]
    key = next(k for k in teacher_sd if k.endswith("blocks.0.attn.qkv.weight"))
    run_key = next(k for k in run_sd if k.startswith("teacher") and k.endswith("blocks.0.attn.qkv.weight"))
    torch.testing.assert_close(run_sd[run_key], teacher_sd[key])

    # Other teacher settings: another cache entry.
    assert train_cli.main(_tiny(recipe, tmp_path / "c", cache, "method.teacher.embed_dim=12")) == 0
    assert len(glob.glob(str(cache / "teachers" / "*" / "checkpoint.pt"))) == 2
