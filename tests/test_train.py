"""The training driver: configs, schedules, k-NN, a full tiny run, exact resume, 2-process DDP.

Runs use a tiny ImageFolder written into a temporary directory (3 classes, 24 train / 12 val
images of 32 px), a 1-block ViT and the torch loader without workers, so a whole run takes seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from fastmask.config import ConfigError, config_to_dict, load_config
from fastmask.train import Trainer, cosine_schedule, knn_accuracy, main, step_seed
from helpers import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]


def _class_image(rng, c):
    """Dark noise with a coloured horizontal bar (class 0), vertical bar (1) or square (2)."""
    img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
    if c == 0:
        img[12:20, :] = COLOURS[c]
    elif c == 1:
        img[:, 12:20] = COLOURS[c]
    else:
        img[8:24, 8:24] = COLOURS[c]
    return img


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """root/{train,val}/<class>/*.jpg: three classes told apart by colour and a bar's orientation."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_folder"), (("train", 8), ("val", 4)), len(COLOURS),
                              _class_image, quality=95)


def tiny_overrides(folder, out_dir, *extra):
    return [
        f"data.data={folder}", "data.batch_size=8", "data.num_workers=0", "data.num_local_crops=2",
        f"data.cache_dir={os.path.join(str(out_dir), 'cache')}",
        "data.image_size=32", "data.local_size=16",
        "model.depth=1", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=8", "model.img_size=32",
        "method.out_dim=64", "method.head_hidden_dim=32", "method.head_bottleneck_dim=16",
        "method.warmup_teacher_temp_epochs=1",
        "epochs=2", "optim.warmup_epochs=1", "log_every=1", "eval_every=0", "knn_k=5", "attn_images=2",
        "tensorboard=false", "progress_bar=false", f"output_dir={out_dir}", *extra,
    ]


# ------------------------------------------------------------------------------------- config

def test_default_config_is_dino_with_student_global_masking():
    cfg = load_config()
    assert cfg.method_name == "dino"
    assert cfg.method.student_mask == "random" and cfg.method.student_mask_ratio > 0
    assert cfg.data.data == "builtin:shapes"
    assert cfg.model.img_size == cfg.data.image_size


@pytest.mark.parametrize("recipe", ["dino_tiny_builtin", "dino_tiny_miniimagenet", "ibot_vits16_attmask_high",
                                    "ibot_tiny_builtin"])
def test_recipes_load(recipe):
    cfg = load_config(config=recipe)
    assert cfg.method_name in ("dino", "ibot")
    if recipe == "ibot_vits16_attmask_high":
        assert (cfg.method.mask, cfg.model.arch, cfg.model.patch_size, cfg.epochs) == ("attmask_high", "vit_small", 16, 100)
        assert tuple(cfg.method.mask_ratio) == (0.1, 0.5) and cfg.method.mask_prob == 0.5


@pytest.mark.parametrize("overrides,needle", [
    (["optim.lrr=1e-3"], "unknown key optim.lrr; did you mean 'lr'"),
    (["nonsense=1"], "unknown key nonsense"),
    (["method.student_mask_ration=0.4"], "did you mean 'student_mask_ratio'"),
    (["epochs=ten"], "epochs: expected an integer"),
    (["optim.lr=-1"], "optim.lr: must be > 0"),
    (["method.student_mask=everything"], "student_mask must be one of"),
    (["method.student_mask=attmask_high", "method.student_mask_mode=drop"], "student_mask_mode=drop"),
    (["model.img_size=30"], "not divisible"),
    (["data.image_size=64"], "differs from model.img_size"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["resume=/no/such/checkpoint.pt"], "checkpoint not found"),
    (["amp=fp8"], "amp: must be one of"),
    (["optim.lr"], "must look like key=value"),
    (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values"),
    (["data.batch_size=abc"], "data.batch_size: expected an integer, got 'abc'"),
    (["model=3"], "model: expected a mapping of ModelConfig fields"),
    (["compile=maybe"], "compile: must be none, blocks or step"),
    (["method.attmask_ratio=0.3"], "method.attmask_ratio: expected a list of 2 values, got 0.3"),
])
def test_bad_config_fails_with_a_clear_one_line_message(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value), str(err.value)


def test_overrides_are_typed_and_merged_over_the_recipe():
    cfg = load_config(config="dino_tiny_builtin", overrides=[
        "epochs=3.0", "optim.lr=1", "amp=off", "method_cfg.attmask_ratio=[0.2, 0.4]", "model.checkpoint=none"])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.amp == "off" and cfg.method.attmask_ratio == (0.2, 0.4) and cfg.model.checkpoint is None
    assert isinstance(cfg.optim.betas, tuple) and type(cfg.method).__name__ == "DINOConfig"


@pytest.mark.parametrize("recipe,module,check", [
    ("masksub_tiny_builtin", "masksub", "check_masksub_config"),
    ("maskedkd_tiny_builtin", "maskedkd", "check_maskedkd_config"),
    ("maskdistill_tiny_builtin", "maskdistill", "check_maskdistill_config"),
])
def test_method_checks_run_once(recipe, module, check, monkeypatch):
    """Loading a recipe and building its method runs the method's option check exactly once."""
    import importlib
    import warnings

    mod = importlib.import_module(f"fastmask.methods.{module}")
    calls = []
    original = getattr(mod, check)
    monkeypatch.setattr(mod, check, lambda c: (calls.append(c), original(c))[1])
    cfg = load_config(config=recipe, overrides=["model.depth=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teachers
        mod.METHOD(cfg, 3)
    assert len(calls) == 1


@pytest.mark.parametrize("recipe", ["maskedkd_tiny_builtin", "maskdistill_tiny_builtin"])
def test_teacher_section_is_shared_and_built_by_one_function(recipe, monkeypatch):
    import warnings

    from fastmask.config import TeacherConfig
    from fastmask.methods import base, get_method

    cfg = load_config(config=recipe, overrides=["method.teacher.depth=1", "method.teacher.arch=vit_tiny",
                                                "method.teacher.embed_dim=24", "method.teacher.num_heads=2"])
    assert isinstance(cfg.method.teacher, TeacherConfig) and cfg.method.teacher.depth == 1
    built = []
    original = base.build_teacher
    module = __import__(f"fastmask.methods.{cfg.method_name}", fromlist=["build_teacher"])
    monkeypatch.setattr(module, "build_teacher", lambda *a, **k: built.append(a[0]) or original(*a, **k))
    with pytest.warns(UserWarning, match="method.teacher.checkpoint"):
        method = get_method(cfg.method_name)(cfg, 3)
    assert built == [cfg.method.teacher]
    assert len(method.teacher.blocks) == 1 and method.teacher.embed_dim == 24
    assert not any(p.requires_grad for p in method.teacher.parameters()) and not method.teacher.training
    with pytest.raises(ConfigError, match="unknown key method.teacher.depht; did you mean 'depth'"):
        load_config(config=recipe, overrides=["method.teacher.depht=1"])
    with pytest.raises(ConfigError, match="method.teacher.num_heads must be >= 0"):
        load_config(config=recipe, overrides=["method.teacher.num_heads=-2"])


def test_bad_recipe_and_method(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'dinosaur'"):
        load_config(method="dinosaur")
    with pytest.raises(ConfigError, match="not found"):
        load_config(config=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dino\nmodel:\n  arch: vit_tiny\n  depht: 3\n")
    with pytest.raises(ConfigError, match="unknown key model.depht; did you mean 'depth'"):
        load_config(config=str(bad))
    bad.write_text("method: ibot\nmethod_cfg:\n  student_mask: random\n")
    with pytest.raises(ConfigError, match="unknown key method_cfg.student_mask"):
        load_config(config=str(bad))
    with pytest.raises(ConfigError, match="contradicts"):
        load_config(method="dino", config="ibot_tiny_builtin")


@pytest.mark.parametrize("recipe", ["dino_tiny_builtin", "ibot_tiny_builtin"])
def test_self_distillation_config_checks(recipe):
    # Both EMA teacher-student methods validate the multi-crop geometry before any training.
    with pytest.raises(ConfigError, match="local_size=12 is not divisible by model.patch_size=8"):
        load_config(config=recipe, overrides=["data.local_size=12"])
    with pytest.raises(ConfigError, match="loaders emit 2 global views"):
        load_config(config=recipe, overrides=["method.num_global_crops=3"])


def test_cli_bad_config_exits_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--method", "dino", f"output_dir={out}", "optim.weight_decay_ends=0.1"])
    assert rc == 2
    assert "unknown key optim.weight_decay_ends" in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def test_cli_overrides_before_and_after_options(tmp_path, capsys):
    # key=value pairs on both sides of an option are all read (argparse alone would reject the second run)
    out = tmp_path / "run"
    rc = main([f"output_dir={out}", "--data", "builtin:shapes", "epochs=2", "optim.lrr=1"])
    assert rc == 2
    assert "unknown key optim.lrr" in capsys.readouterr().err
    assert not out.exists()


def test_config_round_trip(tmp_path):
    cfg = load_config(config="ibot_tiny_builtin", overrides=["method.mask=attmask_hint", "optim.lr=0.001"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    again = load_config(config=str(path))
    assert config_to_dict(again) == config_to_dict(cfg)


# ------------------------------------------------------------------------------------- pieces

def test_cosine_schedule():
    total, warm = 100, 10
    assert cosine_schedule(0, total, 1.0, 0.1, warm) == 0.0
    assert cosine_schedule(5, total, 1.0, 0.1, warm) == pytest.approx(0.5)
    assert cosine_schedule(10, total, 1.0, 0.1, warm) == pytest.approx(1.0)
    assert cosine_schedule(55, total, 1.0, 0.1, warm) == pytest.approx(0.55)
    assert cosine_schedule(100, total, 1.0, 0.1, warm) == pytest.approx(0.1)
    vals = [cosine_schedule(s, total, 0.996, 1.0) for s in range(total)]
    assert vals[0] == pytest.approx(0.996) and all(b >= a for a, b in zip(vals, vals[1:]))


def test_step_seed_is_a_function_of_seed_step_rank():
    assert step_seed(0, 5) == step_seed(0, 5)
    assert len({step_seed(0, s, r) for s in range(50) for r in range(2)} | {step_seed(1, 0)}) == 101


def test_knn_accuracy_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    n_train, n_val, d, c, k, t = 60, 17, 8, 4, 7, 0.1
    tr = torch.nn.functional.normalize(torch.randn(n_train, d, generator=gen), dim=1)
    va = torch.nn.functional.normalize(torch.randn(n_val, d, generator=gen), dim=1)
    tr_y = torch.randint(0, c, (n_train,), generator=gen)
    va_y = torch.randint(0, c, (n_val,), generator=gen)
    got = knn_accuracy(tr, tr_y, va, va_y, c, k=k, temperature=t, chunk=5)
    correct = 0
    for i in range(n_val):
        sims = [(float(va[i] @ tr[j]), j) for j in range(n_train)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * c
        for s, j in sims[:k]:
            votes[int(tr_y[j])] += float(np.exp(s / t))
        correct += int(np.argmax(votes) == int(va_y[i]))
    assert got["knn_top1"] == pytest.approx(100.0 * correct / n_val)
    # perfectly separated clusters -> 100 %
    centers = torch.eye(c, d)
    assert knn_accuracy(centers[tr_y], tr_y, centers[va_y], va_y, c, k=k)["knn_top1"] == 100.0


# ------------------------------------------------------------------------------------- runs

def _state(path):
    return torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu", weights_only=False)


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("method_name,extra", [
    ("dino", ["method.student_mask=random", "method.student_mask_mode=drop"]),
    ("ibot", ["method.mask=attmask_high", "method.patch_out_dim=64"]),
    ("dino", ["data.batch_size=4", "optim.accum_steps=2"]),  # 2 loader batches per step
])
def test_kill_and_resume_gives_the_uninterrupted_parameters(tiny_folder, tmp_path, method_name, extra):
    recipe = f"{method_name}_tiny_builtin"
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = Trainer(load_config(config=recipe, overrides=tiny_overrides(tiny_folder, full_dir, *extra)))
    assert full.steps_per_epoch == 3
    summary = full.fit()
    assert summary["step"] == 6

    # "Kill" after 4 steps (in the middle of epoch 2), then a new trainer resumes to the end.
    cut = Trainer(load_config(config=recipe, overrides=tiny_overrides(tiny_folder, cut_dir, "max_steps=4", *extra)))
    cut.fit()
    ck = _state(cut_dir)
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (4, 1, 1)
    resumed = Trainer(load_config(config=recipe, overrides=tiny_overrides(tiny_folder, cut_dir, "resume=auto", *extra)))
    assert resumed.step == 4
    resumed.fit()

    a, b = _state(full_dir), _state(cut_dir)
    assert a["step"] == b["step"] == 6
    _assert_same_tensors(a["method"], b["method"], "method")
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert a["last_eval"]["knn_top1"] == b["last_eval"]["knn_top1"]


@pytest.mark.slow
def test_full_run_logs_metrics_attention_maps_and_knn(tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(config="dino_tiny_builtin",
                      overrides=tiny_overrides(tiny_folder, out, "eval_every=1", "tensorboard=true"))
    summary = Trainer(cfg).fit()
    assert 0.0 <= summary["knn_top1"] <= 100.0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["lr"] >= 0
    # lr warms up over epoch 1 then decays; the teacher momentum rises towards 1
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == 0.0 and max(lrs) == lrs[3] and lrs[-1] < lrs[3]
    assert steps[-1]["teacher_momentum"] > steps[0]["teacher_momentum"]
    evals = [r for r in records if r.get("event") == "eval"]
    assert len(evals) == 2 and all("knn_top1" in r for r in evals)
    assert sorted(os.listdir(out / "attention")) == ["epoch0001.png", "epoch0002.png"]
    with open(out / "attention" / "epoch0001.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").exists() and (out / "checkpoint.pt").exists()
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # atomic writes leave no temporaries
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return
    assert os.listdir(out / "tb")


@pytest.mark.slow
def test_ddp_two_processes_gloo(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    cfg = load_config(config="dino_tiny_builtin", overrides=tiny_overrides(tiny_folder, out))
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = dict(os.environ, FASTMASK_BACKEND="torch", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastmask.train", "--config", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ck = _state(out)
    # 24 images over 2 ranks at batch 8 (drop_last): 1 step per epoch, global batch 16
    assert ck["steps_per_epoch"] == 1 and ck["step"] == 2
    assert set(ck["rng"]) == {0, 1}
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any(r.get("event") == "end" and "knn_top1" in r for r in records)
    assert "k-NN top-1" in proc.stdout


def test_warmup_longer_than_the_run_is_shortened_with_a_notice(capsys):
    # epochs=1 on a recipe with a longer warm-up (the natural smoke test) runs, warming up for half of it.
    cfg = load_config(config="ibot_tiny_builtin", overrides=["epochs=1"])
    assert cfg.optim.warmup_epochs == 0.5
    assert "warm-up shortened to 0.5 epochs" in capsys.readouterr().out
    assert load_config(config="ibot_tiny_builtin", overrides=["epochs=4", "optim.warmup_epochs=3"]).optim.warmup_epochs == 3
