"""Every user mistake on a fastmask command line: exit status 2, one line on stderr that names the
problem, and nothing written to disk."""
import os

import pytest
import torch

from fastmask import analyze


def assert_one_line_usage_error(code, capsys, prog, expected, out):
    """A user mistake: exit status 2, one line on stderr from ``prog`` that holds ``expected``, and
    ``out`` not written.  Returns the line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: "), err
    assert expected in err[0], err
    assert not out.exists()
    return err[0]


def _analyze_cases(tmp_path):
    ckpt = tmp_path / "weights.pt"
    torch.save({"not": torch.zeros(1)}, ckpt)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 this is not a torch zip file at all")
    return {
        "missing checkpoint": (["--checkpoint", str(tmp_path / "nope.pt")], "does not exist"),
        "checkpoint is a folder": (["--checkpoint", str(tmp_path)], "not a file"),
        "zero-byte checkpoint": (["--checkpoint", str(empty)], "is empty (0 bytes)"),
        "corrupt checkpoint": (["--checkpoint", str(junk)], "truncated or corrupt"),
        "no state dict in it": (["--checkpoint", str(ckpt)], "weights.pt"),
        "bad prefix": (["--checkpoint", f"{ckpt}#student.nothing."], "weights.pt"),
        "unknown measure": (["--checkpoint", str(ckpt), "--measures", "attention,nmi"], "unknown measure(s) nmi"),
        "empty measures": (["--checkpoint", str(ckpt), "--measures", ","], "unknown measure"),
        "bad data path": (["--checkpoint", str(ckpt), "--data", str(tmp_path / "no_data")], "--data"),
        "bad builtin": (["--checkpoint", str(ckpt), "--data", "builtin:nope"], "builtin:shapes"),
        "bad max batches": (["--checkpoint", str(ckpt), "--max-batches", "0"], "--max-batches must be >= 1"),
        "labels mismatch": (["--checkpoint", str(ckpt), "--label", "a", "--label", "b"], "--label given 2 times"),
        "bad model arg": (["--checkpoint", str(ckpt), "--model-arg", "depth"], "key=value"),
    }




@pytest.mark.parametrize("case", [
    "missing checkpoint", "checkpoint is a folder", "zero-byte checkpoint", "corrupt checkpoint",
    "no state dict in it", "bad prefix", "unknown measure", "empty measures", "bad data path", "bad builtin",
    "bad max batches", "labels mismatch", "bad model arg",
])
def test_analyze_user_errors_are_one_line_exit_2(tmp_path, capsys, case):
    args, expected = _analyze_cases(tmp_path)[case]
    out = tmp_path / "out"
    code = analyze.main(args + ["--out", str(out), "--no-progress"])
    assert_one_line_usage_error(code, capsys, "fastmask.analyze", expected, out)


def test_analyze_help_names_every_measure(capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for measure in analyze.ALL_MEASURES:
        assert f"  {measure} " in text
    for word in ("distance", "entropy", "NMI", "Hessian", "landscape"):
        assert word in text
    assert "``" not in text and "\\\\" not in text  # no raw RST


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_DEBUG", "1")
    with pytest.raises(Exception, match="does not exist"):
        analyze.main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------ fastmask.train

from fastmask import train as train_cli  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """root/{train,val}/<class>/*.png (2 classes, 8 + 2 images of 32 px) and an empty folder."""
    import numpy as np

    from helpers import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("tiny_data"), (("train", 8), ("val", 2)), 2,
                              lambda rng, c: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), name="c{c}/{i}.png")
    return root, str(tmp_path_factory.mktemp("empty_data"))


def _tiny_run(data, out, *extra):
    """A DINO run of a few seconds: 1 block, 32 px, batch 4, 2 steps per epoch."""
    return ["--data", data, "--output-dir", str(out), "data.batch_size=4", "data.num_workers=0",
            "data.num_local_crops=1", "data.image_size=32", "data.local_size=16", "data.loader=torch",
            f"data.cache_dir={out}_cache", "model.depth=1", "model.embed_dim=24", "model.num_heads=2",
            "model.patch_size=8", "model.img_size=32", "method.out_dim=16", "method.head_hidden_dim=16",
            "method.head_bottleneck_dim=8", "method.warmup_teacher_temp_epochs=0", "epochs=1", "log_every=1",
            "knn_k=2", "attn_images=1", "tensorboard=false", "progress_bar=false", *extra]


def _fake_checkpoint(path, **config):
    """What preflight reads of a driver checkpoint (it refuses before loading any weights)."""
    cfg = {"method": "dino", "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1,
                                        "embed_dim": 24, "num_heads": 2}, "data": {"batch_size": 4}}
    for k, v in config.items():
        section, key = k.split("__")
        cfg[section][key] = v
    torch.save({"method": {}, "optimizer": {}, "step": 2, "epoch": 1, "steps_per_epoch": 4,
                "rng": {0: None}, "config": cfg}, path)
    return str(path)


def _train_cases(tmp_path, data, empty):
    junk = tmp_path / "junk" / "checkpoint.pt"
    junk.parent.mkdir()
    junk.write_bytes(b"PK\x03\x04 not a zip")
    (junk.parent / "checkpoint.prev.pt").write_bytes(b"")
    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    other_bs = _fake_checkpoint(tmp_path / "bs.pt", data__batch_size=8)
    other_arch = _fake_checkpoint(tmp_path / "arch.pt", model__arch="vit_base")
    other_world = tmp_path / "world.pt"
    ck = torch.load(_fake_checkpoint(other_world), weights_only=False)
    ck["rng"] = {0: None, 1: None}
    torch.save(ck, other_world)
    return {
        # configuration (found while merging the config)
        "unknown key": (["optim.lrr=1"], "unknown key optim.lrr"),
        "wrong type": (["epochs=ten"], "epochs: expected an integer"),
        # data section
        "batch_size=0": (["data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
        "loader=gpu": (["data.loader=gpu"], "data.loader: must be one of dali, torch, auto, got 'gpu'"),
        "num_workers=-1": (["data.num_workers=-1"], "data.num_workers: must be >= 0"),
        "global_scale reversed": (["data.global_scale=[0.5,0.2]"], "data.global_scale: must be [lo, hi]"),
        "validate=maybe": (["data.validate=maybe"], "data.validate: must be one of"),
        # model names
        "arch=vit_huge": (["model.arch=vit_huge"], "model.arch: unknown ViT 'vit_huge'"),
        # data source
        "no such path": (["--data", str(tmp_path / "no" / "such")], "does not exist"),
        "empty folder": (["--data", empty], "split directory"),
        "builtin:nope": (["--data", "builtin:nope"], "unknown built-in dataset 'nope'"),
        "batch larger than data": (["data.batch_size=64"], "fewer than batch_size=64"),
        # device / AMP (a CPU machine)
        "device=cuda": (["device=cuda"], "no CUDA device is visible; use device=cpu"),
        "amp=fp16": (["amp=fp16", "device=cpu"], "amp=fp16 needs a CUDA device"),
        # resume
        "resume missing file": (["--resume", str(tmp_path / "nope.pt")], "checkpoint not found"),
        "resume corrupt, prev kept": (["--resume", str(junk)], "truncated or corrupt"),
        "resume zero bytes": (["--resume", str(zero)], "is empty (0 bytes)"),
        "resume a weights file": (["--resume", str(weights)], "not a fastmask.train checkpoint"),
        "resume other batch size": (["--resume", other_bs], "global batch of 8 (data.batch_size=8 x 1 process(es)"),
        "resume other arch": (["--resume", other_arch], "model.arch='vit_base', this run has model.arch='vit_tiny'"),
        # another world size resumes if the global batch is the same (tests/test_engine.py); here it is not
        "resume other world size": (["--resume", str(other_world)], "global batch of 8 (data.batch_size=4 x 2 process(es)"),
        "resume and overwrite": (["--resume", "--overwrite"], "--overwrite and --resume contradict"),
        "resume weights that do not fit": (["--resume", _fake_checkpoint(tmp_path / "fit.pt")],
                                           "does not fit this run's model"),
    }


TRAIN_CASES = [
    "unknown key", "wrong type", "batch_size=0", "loader=gpu", "num_workers=-1", "global_scale reversed",
    "validate=maybe", "arch=vit_huge", "no such path", "empty folder", "builtin:nope", "batch larger than data",
    "device=cuda", "amp=fp16", "resume missing file", "resume corrupt, prev kept", "resume zero bytes",
    "resume a weights file", "resume other batch size", "resume other arch", "resume other world size",
    "resume and overwrite", "resume weights that do not fit",
]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_user_errors_are_one_line_exit_2_nothing_written(tmp_path, capsys, tiny_data, case):
    if HAS_CUDA and case in ("device=cuda", "amp=fp16"):
        pytest.skip("a CUDA device is visible: these are not mistakes here")
    data, empty = tiny_data
    extra, expected = _train_cases(tmp_path, data, empty)[case]
    out = tmp_path / "out"
    err = assert_one_line_usage_error(train_cli.main(_tiny_run(data, out) + extra), capsys, "fastmask.train", expected, out)
    if case == "resume corrupt, prev kept":
        assert "checkpoint.pt" in err and "--resume " + str(tmp_path / "junk" / "checkpoint.prev.pt") in err


def test_train_help_lists_recipes_and_config_groups(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    from fastmask.config import RECIPE_DIR

    for name in os.listdir(RECIPE_DIR):
        if name.endswith(".yaml"):
            assert f"  {name[:-5]} " in text, name
    for group in ("model.", "data.", "optim.", "method.", "warmup_epochs", "batch_size", "--overwrite"):
        assert group in text


def _records(out):
    import json

    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_output_dir_never_mixes_runs(tmp_path, capsys, tiny_data):
    """A finished run; a fresh run into the same folder is refused (nothing changed), --overwrite
    starts over, a killed run's tmp file and later records are dropped on --resume."""
    data, _ = tiny_data
    out = tmp_path / "run"
    assert train_cli.main(_tiny_run(data, out, "epochs=2", "max_steps=6")) == 0  # 4 steps per epoch
    first = _records(out)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6
    assert torch.load(out / "checkpoint.prev.pt", weights_only=False)["step"] == 4
    capsys.readouterr()

    before = sorted(os.listdir(out))
    assert train_cli.main(_tiny_run(data, out, "epochs=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert sorted(os.listdir(out)) == before and _records(out) == first

    # A killed run: records logged after the checkpoint's step and a half-written checkpoint.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0}\n{"step": 8, "lo')
    (out / "checkpoint.pt.tmp.12345").write_bytes(b"partial")
    assert train_cli.main(_tiny_run(data, out, "epochs=2", "--resume")) == 0
    text = capsys.readouterr().out
    assert "resuming the run in" in text and "removed 1 temporary checkpoint file" in text
    assert not (out / "checkpoint.pt.tmp.12345").exists()
    steps = [r["step"] for r in _records(out) if "loss" in r and "event" not in r]
    assert steps == list(range(1, 9)), steps  # no duplicated or stale step records

    assert train_cli.main(_tiny_run(data, out, "--overwrite")) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    steps = [r["step"] for r in _records(out) if "loss" in r and "event" not in r]
    assert steps == [1, 2, 3, 4]
    assert not (out / "checkpoint.prev.pt").exists()


@pytest.mark.slow
def test_resume_from_a_corrupt_checkpoint_offers_the_previous_one(tmp_path, capsys, tiny_data):
    data, _ = tiny_data
    out = tmp_path / "run"
    assert train_cli.main(_tiny_run(data, out, "epochs=2")) == 0
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])  # cut off
    capsys.readouterr()
    assert train_cli.main(_tiny_run(data, out, "epochs=3", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt" in err[0] and str(out / "checkpoint.pt") in err[0], err
    prev = str(out / "checkpoint.prev.pt")
    assert f"--resume {prev}" in err[0]
    assert train_cli.main(_tiny_run(data, out, "epochs=3", "--resume", prev)) == 0
    assert "resuming the run" in capsys.readouterr().out


def test_tensorboard_purge_step_on_resume(tmp_path, monkeypatch):
    """RunLog(purge_step=S) drops metrics records after S and opens TensorBoard with purge_step S+1."""
    from fastmask.engine import loop

    seen = {}

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            seen["purge_step"] = purge_step

        def add_scalar(self, *a):
            pass

        def close(self):
            pass

    import torch.utils.tensorboard as tb

    monkeypatch.setattr(tb, "SummaryWriter", FakeWriter)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    log = loop.RunLog(str(tmp_path), True, True, purge_step=2)
    log({"step": 3, "loss": 0.5}, 3)
    log.close()
    assert seen["purge_step"] == 3
    assert _records(tmp_path) == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5}]


# ------------------------------------------------------------------ eval / export / attention_maps

def _checkpoint_cli_cases(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 not a torch file")
    bad_safetensors = tmp_path / "junk.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return {"missing": (str(tmp_path / "nope.pt"), "nope.pt"), "zero bytes": (str(empty), "is empty (0 bytes)"),
            "corrupt": (str(junk), "truncated or corrupt"),
            "corrupt safetensors": (str(bad_safetensors), "cannot read checkpoint")}


@pytest.mark.parametrize("prog", ["eval", "export", "attention_maps"])
@pytest.mark.parametrize("case", ["missing", "zero bytes", "corrupt", "corrupt safetensors"])
def test_checkpoint_clis_user_errors_are_one_line_exit_2(tmp_path, capsys, prog, case):
    import importlib

    module = importlib.import_module(f"fastmask.{prog}")
    path, expected = _checkpoint_cli_cases(tmp_path)[case]
    out = tmp_path / "out"
    extra = {"eval": ["--out", str(out / "r.json")], "export": ["--out", str(out / "w.safetensors")],
             "attention_maps": ["--out", str(out)]}[prog]
    assert_one_line_usage_error(module.main([path, *extra]), capsys, f"fastmask.{prog}", expected, out)


def test_driver_attention_maps_have_a_colour_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fastmask.engine.evaluation import attention_figure

    imgs = np.random.default_rng(0).random((3, 16, 16, 3))
    maps = [np.full((16, 16), v) for v in (0.1, 0.2, 0.4)]
    fig = attention_figure(plt, imgs, maps)
    assert len(fig.axes) == 2 * 3 + 1  # the image axes and the colour bar's
    bar_ax = fig.axes[-1]
    assert "attention" in bar_ax.get_ylabel()
    overlays = [ax.images[-1] for ax in fig.axes[3:6]]
    assert all(im.get_clim() == (0.0, 0.4) for im in overlays)  # one shared scale
    plt.close(fig)


def test_log_lines_print_above_the_progress_bar(monkeypatch):
    """print() and warnings while the bar is shown: whole lines, each written with the bar cleared
    and redrawn after it (no log text inside the bar's line)."""
    import io
    import sys
    import warnings

    from fastmask.engine.progress import BarSafeStream, progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, out = Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar = progress_bar(total=4, initial=0, file=term)
    assert isinstance(sys.stdout, BarSafeStream)
    events = []
    monkeypatch.setattr(bar, "clear", lambda nolock=False: events.append("clear"))
    monkeypatch.setattr(bar, "refresh", lambda nolock=False: events.append("refresh"))
    bar.update(1)
    print("[fastmask] epoch 1: k-NN", "knn_top1 50.00")
    print("two", end="")
    print(" parts")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a warning")
    bar.close()
    assert sys.stdout is out
    assert out.getvalue() == "[fastmask] epoch 1: k-NN knn_top1 50.00\ntwo parts\n"
    assert events[:4] == ["clear", "refresh", "clear", "refresh"]
    assert "[fastmask]" not in term.getvalue()  # the bar's stream holds only the bar
