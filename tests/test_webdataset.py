"""Webdataset shards: built from built-in data, read by the torchvision path and DALI's webdataset
reader; equal to the ImageFolder pipeline on the same images; shard-per-rank split; resume."""
import json
import os

import numpy as np
import pytest
import torch

from fastmask.data import DataConfig, make_loader, resolve_data_root, write_shards
from fastmask.data.dali_loader import dali_available
from fastmask.data.folder import DatasetError, ShardPlan
from fastmask.data.webdataset import main as wds_main, scan_shards
from test_train import tiny_folder  # noqa: F401  (fixture)

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable here")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """builtin:shapes (1000 train / 200 val JPEGs, 10 classes) as shards of 128 samples."""
    root = resolve_data_root(DataConfig(data="builtin:shapes"))
    out = tmp_path_factory.mktemp("wds")
    assert wds_main([root, str(out), "--samples-per-shard", "128"]) == 0
    return root, str(out)


def _cfg(data, loader, **kw):
    base = dict(data=data, loader=loader, batch_size=16, num_workers=0, image_size=32, local_size=16,
                num_local_crops=2, validate="none")
    base.update(kw)
    return DataConfig(**base)


def _batches(loader, n=None):
    out = []
    for i, (x, y) in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append((x, y))
    return out


def test_shards_hold_every_image_with_its_label(shards):
    root, out = shards
    train = scan_shards(out, "train")
    assert len(train.shards) == 8 and train.shard_sizes == [128] * 7 + [104] and len(train) == 1000
    assert train.num_classes == 10 and all(i is not None for i in train.index_files)
    manifest = json.load(open(os.path.join(out, "train", "shards.json")))
    assert manifest["samples"] == train.shard_sizes
    # The idx files are what DALI's own wds2idx writes (version line + one line per sample).
    first = open(train.index_files[0]).read().splitlines()
    assert first[0] == "v1.2 128" and first[1].split()[0] == "jpg" and first[1].split()[4] == "cls"


@pytest.mark.parametrize("pipeline,split", [("eval", "val"), ("supervised", "train"), ("multicrop", "train")])
def test_torch_shard_pipeline_equals_imagefolder(shards, pipeline, split):
    root, out = shards
    kw = dict(shuffle=False, seed=3)
    ref = make_loader(_cfg(root, "torch"), split, pipeline, **kw)
    wds = make_loader(_cfg(out, "torch"), split, pipeline, **kw)
    assert type(wds).__name__ == "TorchShardLoader" and len(wds) == len(ref) and wds.num_classes == ref.num_classes
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        wds.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(_batches(ref, 3), _batches(wds, 3)):
            assert torch.equal(ya, yb)
            for a, b in zip(xa if isinstance(xa, list) else [xa], xb if isinstance(xb, list) else [xb]):
                assert torch.equal(a, b)


def test_rank_split_reads_whole_disjoint_tars_and_agrees_on_length():
    sizes = [128] * 7 + [104]
    plans = [ShardPlan.of_tars(sizes, 16, rank, 3, seed=1) for rank in range(3)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    assert {len(p) for p in plans} == {14}  # 2 tars per rank; the 2 smallest hold 232 samples = 14 batches
    for epoch in range(3):
        tars = [p.shards_for(epoch) for p in plans]
        flat = sum(tars, [])
        assert len(flat) == len(set(flat)) == 6  # 8 // 3 * 3 tars used, none twice
        for p, mine in zip(plans, tars):
            idx = p.indices(epoch)
            assert len(idx) == 14 * 16
            first = mine[0]
            assert np.array_equal(idx[:sizes[first]], np.arange(starts[first], starts[first] + sizes[first]))
    assert plans[0].shards_for(0) != plans[0].shards_for(1) or plans[0].shards_for(1) != plans[0].shards_for(2)
    ev = [ShardPlan.of_tars(sizes, 16, r, 3, shuffle=False, drop_last=False) for r in range(3)]
    assert sorted(np.concatenate([p.indices(0) for p in ev]).tolist()) == list(range(1000))
    with pytest.raises(DatasetError, match="cannot be split over 9 ranks"):
        ShardPlan.of_tars(sizes, 16, 0, 9)


def test_resume_skips_batches_without_reading_them(shards):
    _, out = shards
    loader = make_loader(_cfg(out, "torch"), "train", "supervised", seed=5, shard_id=3, num_shards=4)
    loader.set_epoch(2)
    full = _batches(loader)
    loader.set_epoch(2)
    loader.set_start_batch(len(full) - 2)
    rest = _batches(loader)
    assert len(rest) == 2
    for (xa, ya), (xb, yb) in zip(full[-2:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(_batches(loader)) == len(full)  # the skip applies to one epoch only


@needs_dali
def test_dali_webdataset_reader_equals_the_dali_file_reader(shards):
    root, out = shards
    ref = make_loader(_cfg(root, "dali", batch_size=24), "val", "eval")
    wds = make_loader(_cfg(out, "dali", batch_size=24), "val", "eval")
    assert type(wds).__name__ == "DaliShardLoader"
    a, b = _batches(ref), _batches(wds)
    assert len(a) == len(b) == 9 and b[-1][1].numel() == 200 - 8 * 24
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # Training: a rank's tars, truncated to full batches, and resume via a trimmed index.
    train = make_loader(_cfg(out, "dali"), "train", "multicrop", shard_id=1, num_shards=2, seed=1)
    train.set_epoch(1)
    labels = torch.cat([y for _, y in _batches(train)])
    split = scan_shards(out, "train")
    expected = torch.tensor(split.labels)[torch.from_numpy(train.plan.indices(1))]
    assert torch.equal(labels, expected) and len(labels) == len(train) * 16
    train.set_epoch(1)
    train.set_start_batch(len(train) - 3)
    tail = _batches(train)
    assert len(tail) == 3 and torch.equal(torch.cat([y for _, y in tail]), expected[-48:])
    assert [c.shape[-1] for c in tail[0][0]] == [32, 32, 16, 16]


@pytest.mark.slow
def test_training_on_shards_resumes_exactly(tiny_folder, tmp_path):
    """A DINO run on shards killed mid-epoch and resumed (the loader skips the done batches without
    reading them) ends with the uninterrupted run's parameters."""
    from fastmask.config import load_config
    from fastmask.engine.loop import Trainer
    from test_train import _assert_same_tensors, _state, tiny_overrides

    shards = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(tiny_folder, split, str(shards), samples_per_shard=4)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = Trainer(load_config(config="dino_tiny_builtin", overrides=tiny_overrides(str(shards), full_dir)))
    assert type(full.train_loader).__name__ == "TorchShardLoader" and full.steps_per_epoch == 3
    full.fit()
    Trainer(load_config(config="dino_tiny_builtin", overrides=tiny_overrides(str(shards), cut_dir, "max_steps=4"))).fit()
    resumed = Trainer(load_config(config="dino_tiny_builtin", overrides=tiny_overrides(str(shards), cut_dir,
                                                                                      "resume=auto")))
    read = []
    decode = resumed.train_loader._inner._loader.dataset.decode
    resumed.train_loader._inner._loader.dataset.decode = lambda h: read.append(h) or decode(h)
    resumed.fit()
    assert len(read) == 2 * 8  # epoch 2's last two batches only: the first was skipped unread
    a, b = _state(full_dir), _state(cut_dir)
    assert a["step"] == b["step"] == 6
    _assert_same_tensors(a["method"], b["method"], "method")
