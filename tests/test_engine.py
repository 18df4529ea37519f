"""The engine's data parallelism on the CPU (gloo): 2 processes against 1, DDP's reducer overlapping
the backward, FSDP2, gradient accumulation, checkpoints across world sizes, a failing rank.

The 2-process runs use ``torch.distributed.run`` on tests/engine_worker.py (a few AdamW steps of
every method on tiny ViTs, fed the same seeded global batches); the 1-process references run the
same script.  DINO, iBOT and MaskedKD use masks that depend only on the images (AttMask at a fixed
ratio; MaskedKD's attention-picked teacher tokens), so 2 x 4 images must give the parameters of
1 x 8.  MaskSub and MaskDistill draw random masks per slice of the batch; their reference is one
process accumulating the same two seeded slices (optim.accum_steps=2).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from fastmask.config import ConfigError, load_config
from helpers import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "engine_worker.py")
ENV = dict(os.environ, FASTMASK_BACKEND="torch", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
EXACT_MASKS = ("dino", "ibot", "maskedkd")  # compared with 1 process x 8 images
RANDOM_MASKS = ("masksub", "maskdistill")  # compared with 1 process accumulating 2 x 4 images
TOL = 1e-3  # after 3 AdamW steps at lr 1e-2 (measured: <= 1e-4)


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _bar_image(rng, c):
    """Dark noise with a bright horizontal bar whose height gives the class."""
    img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
    img[4 + 8 * c: 12 + 8 * c] = 200
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("engine_folder"), (("train", 8), ("val", 4)), 3, _bar_image)


@pytest.fixture(scope="module")
def references(folder, tmp_path_factory):
    """1 process x 8 images and 1 process x 2 accumulated micro-batches of 4, run side by side."""
    out = tmp_path_factory.mktemp("references")
    runs = {"one": [], "accum": ["--accum", "2"]}
    procs = {k: subprocess.Popen([sys.executable, WORKER, str(out / f"{k}.pt"), "--data", folder, *extra],
                                 env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, extra in runs.items()}
    for k, p in procs.items():
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, log[-3000:]
    return {k: torch.load(out / f"{k}.pt", weights_only=False) for k in runs}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(parallel, folder, references, tmp_path):
    out = tmp_path / f"{parallel}.pt"
    proc = subprocess.run(torchrun(WORKER, str(out), "--data", folder, "--parallel", parallel), env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = torch.load(out, weights_only=False)
    errors = {}
    for name in EXACT_MASKS:
        errors[name] = max_diff(two[name]["state"], references["one"][name]["state"])
    for name in RANDOM_MASKS:
        errors[name] = max_diff(two[name]["state"], references["accum"][name]["state"])
        # ...and the random masks do matter: against 1 x 8 images (other masks) they differ
        assert max_diff(two[name]["state"], references["one"][name]["state"]) > 10 * TOL
    print(f"{parallel}: max |param difference| 2 processes vs 1: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(v < TOL for v in errors.values()), errors
    if parallel == "ddp":
        # DDP's reducer averaged the gradients (no hand-written all-reduce): several buckets a step,
        # the first sent while the backward still had gradients to compute.
        for name in EXACT_MASKS + RANDOM_MASKS:
            probe = two[name]["overlap"]
            events = probe["ready_at_bucket"]
            per_step = len(events) // 3
            assert per_step >= 2, probe
            for step in range(3):
                first = events[step * per_step]
                # MaskSub's main-branch backward (inside the step) readied every gradient once already
                total = probe["grads"] * (2 if name == "masksub" else 1)
                assert first < total, (name, probe)


@pytest.mark.slow
def test_accumulation_equals_the_large_batch_except_batch_statistics(references):
    one, accum = references["one"], references["accum"]
    # MaskedKD (no Mixup, no BatchNorm): 2 x 4 accumulated = 1 x 8
    assert max_diff(one["maskedkd"]["state"], accum["maskedkd"]["state"]) < TOL
    # DINO/iBOT update their centre once per micro-batch (a batch statistic): not the large batch
    for name in ("dino", "ibot"):
        assert max_diff(one[name]["state"], accum[name]["state"]) > 10 * TOL


@pytest.mark.slow
def test_checkpoint_of_two_fsdp_processes_resumes_in_one(folder, tmp_path):
    """2 processes (FSDP2) train 2 of 6 steps and checkpoint; 1 process resumes to the end and
    matches a 1-process run of all 6 steps."""
    from fastmask.engine.loop import Trainer

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from engine_worker import CASES, TINY

    recipe, extra = CASES["maskedkd"]

    def overrides(out, batch, *more):
        return TINY + extra + [f"data.data={folder}", f"data.batch_size={batch}", f"output_dir={out}",
                               f"data.cache_dir={tmp_path / 'cache'}", "attn_images=0", *more]

    cut = tmp_path / "cut"
    cfg = load_config(config=recipe, overrides=overrides(cut, 4, "max_steps=2", "parallel=fsdp",
                                                          "fsdp_mixed_precision=false"))
    recipe_file = tmp_path / "cut.yaml"
    import yaml

    from fastmask.config import config_to_dict

    recipe_file.write_text(yaml.safe_dump(config_to_dict(cfg)))
    proc = subprocess.run(torchrun("-m", "fastmask.train", "--config", str(recipe_file)), env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ck = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert (ck["step"], ck["world_size"], ck["batch_in_epoch"]) == (2, 2, 2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = Trainer(load_config(config=recipe, overrides=overrides(cut, 8, "resume=auto")))
    assert resumed.step == 2
    resumed.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = Trainer(load_config(config=recipe, overrides=overrides(tmp_path / "full", 8)))
    full.fit()
    a = torch.load(cut / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert max_diff(a["method"], b["method"]) < TOL


@pytest.mark.slow
def test_fsdp_bf16_run_with_evaluation(folder, tmp_path):
    """The CLI under FSDP2 with bf16 parameters / float32 reduction: DINO with its EMA teacher and a
    BatchNorm head (a float32 unit), k-NN evaluation and attention maps (every rank in each forward)."""
    out = tmp_path / "run"
    proc = subprocess.run(torchrun(
        "-m", "fastmask.train", "--config", "dino_tiny_builtin", "--data", folder, f"output_dir={out}",
        "parallel=fsdp", "fsdp_mixed_precision=true", "epochs=1", "optim.warmup_epochs=0", "data.batch_size=4",
        "model.depth=1", "model.embed_dim=48", "model.num_heads=3", "data.num_local_crops=2", "data.num_workers=0",
        "data.image_size=32", "data.local_size=16", "method.out_dim=64", "method.head_hidden_dim=32",
        "method.head_bottleneck_dim=16", "method.head_use_bn=true", "attn_images=2", "progress_bar=false",
        "tensorboard=false", f"data.cache_dir={tmp_path / 'cache'}"),
        env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "k-NN top-1" in proc.stdout and (out / "attention" / "epoch0001.png").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["world_size"] == 2 and ck["step"] == 3
    assert all(v.dtype == torch.float32 for k, v in ck["method"].items() if v.is_floating_point())  # full fp32 state


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank(folder, tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(torchrun(WORKER, str(tmp_path / "x.pt"), "--data", folder, "--cases", "maskedkd",
                                   "--fail-rank", "1"), env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1/2 failed: RuntimeError: boom on rank 1" in log
    assert not (tmp_path / "x.pt").exists()
    assert time.perf_counter() - t0 < 240  # no rank waited for a collective timeout


def test_parallel_and_accumulation_options_are_checked():
    with pytest.raises(ConfigError, match="parallel: must be one of ddp, fsdp"):
        load_config(overrides=["parallel=zero3"])
    with pytest.raises(ConfigError, match="use amp=bf16"):
        load_config(overrides=["parallel=fsdp", "amp=fp16"])
    with pytest.raises(ConfigError, match="optim.accum_steps: must be >= 1"):
        load_config(overrides=["optim.accum_steps=0"])
    cfg = load_config(overrides=["optim.accum_steps=4", "data.batch_size=16", "optim.lr=1e-3"])
    assert cfg.optim.accum_steps == 4


def test_train_step_takes_accum_steps_micro_batches(folder, tmp_path):
    from fastmask.engine.loop import Trainer

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from engine_worker import CASES, TINY, global_batches, take

    recipe, extra = CASES["maskedkd"]
    cfg = load_config(config=recipe, overrides=TINY + extra + [
        f"data.data={folder}", "data.batch_size=4", "optim.accum_steps=2", f"output_dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random teacher
        trainer = Trainer(cfg)
    assert trainer.global_batch == 8 and trainer.steps_per_epoch == 3  # 6 loader batches of 4
    batch = global_batches("supervised", 1)[0]
    with pytest.raises(ValueError, match="accum_steps=2 micro-batches, got 1"):
        trainer.train_step([take(batch, 0, 4)], epoch=0)
    out = trainer.train_step([take(batch, 0, 4), take(batch, 4, 8)], epoch=0)
    assert trainer.step == 1 and torch.isfinite(out["loss"])
    trainer.close()


@pytest.mark.slow
def test_a_preflight_error_under_torchrun_is_one_line_and_every_rank_exits_2(folder, tmp_path):
    """Every rank runs the preflight; rank 0 alone prints the mistake, each worker exits with 2
    (torchrun's summary lists each rank's exit code), no traceback, nothing written."""
    out = tmp_path / "run"
    proc = subprocess.run(torchrun(
        "-m", "fastmask.train", "--config", "dino_tiny_builtin", "--data", folder, f"output_dir={out}",
        "data.batch_size=64", "data.num_workers=0", "data.loader=torch", f"data.cache_dir={tmp_path / 'cache'}"),
        env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    lines = [line for line in log.splitlines() if line.startswith("fastmask.train: ")]
    assert proc.returncode != 0
    assert len(lines) == 1 and "fewer than batch_size=64" in lines[0], log[-3000:]
    assert "UsageError" not in log and "failed:" not in log  # no worker's traceback or fail_together line
    codes = [line.split(":", 1)[1].split()[0] for line in log.splitlines() if line.strip().startswith("exitcode")]
    assert codes == ["2", "2"], log[-3000:]
    assert not out.exists()


def test_check_on_every_rank_raises_the_first_failing_ranks_error_everywhere(monkeypatch, capsys):
    """Rank 1 fails where rank 0 passes (a per-rank device, say): both ranks raise the same error,
    which names rank 1; fastmask._cli.run prints it on rank 0 only and every rank finishes with 2."""
    from fastmask import _cli
    from fastmask.engine import distributed as D

    def gather_from(ranks):
        def all_gather_object(out, mine):
            out[:] = ranks
        return all_gather_object

    def fails():
        raise _cli.UsageError("device=cuda:1: only 1 CUDA device(s) are visible")

    monkeypatch.setattr(D.dist, "all_gather_object", gather_from([None, None]))
    assert D.check_on_every_rank(lambda: 7, D.DistInfo(0, 2)) == 7
    msg = "device=cuda:1: only 1 CUDA device(s) are visible"
    monkeypatch.setattr(D.dist, "all_gather_object", gather_from([None, msg]))
    finished = []
    for rank, check in ((0, lambda: 7), (1, fails)):
        with pytest.raises(D.EveryRankUsageError, match=r"^rank 1/2: device=cuda:1: only 1") as raised:
            D.check_on_every_rank(check, D.DistInfo(rank, 2))
        monkeypatch.setattr(raised.value, "finish", finished.append)  # the real one ends the process

        def main(argv, exc=raised.value):
            raise exc

        assert _cli.run("fastmask.train", main, []) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == ([f"fastmask.train: rank 1/2: {msg}"] if rank == 0 else [])
    assert finished == [2, 2]
    with pytest.raises(_cli.UsageError, match="^device=cuda:1"):  # one process: the error itself
        D.check_on_every_rank(fails, D.DistInfo(0, 1))
