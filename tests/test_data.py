"""fastmask.data: DALI (CPU-only, device_id=None) and torchvision pipelines, built-in datasets,
sharding, bad-data handling.  Small images and few crops keep this file fast on a CPU."""
import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastmask.data import DataConfig, DatasetError, augment, builtin, make_loader, scan_image_folder
from fastmask.data.dali_loader import dali_available
from fastmask.data.folder import ShardPlan, check_image_file

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable here")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]
# Normalised values of 0 and 255 bound every output.
LO = min((0 - m) / s for m, s in zip(augment.IMAGENET_MEAN, augment.IMAGENET_STD))
HI = max((1 - m) / s for m, s in zip(augment.IMAGENET_MEAN, augment.IMAGENET_STD))


def _smooth_image(rng, h, w):
    """A colourful image with structure (gradients + a blob), not white noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-200, 200, (2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    img[blob] = rng.uniform(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


def _write_folder(root, counts, seed=0, sizes=(40, 90)):
    """ImageFolder tree: counts = {split: {class: n}}."""
    rng = np.random.default_rng(seed)
    for split, classes in counts.items():
        for cls, n in classes.items():
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(sizes[0], sizes[1], 2))
                Image.fromarray(_smooth_image(rng, h, w)).save(os.path.join(d, f"{i}.jpg"), quality=90)
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    classes = {f"class{k}": 5 for k in range(4)}
    return _write_folder(root, {"train": classes, "val": {c: 3 for c in classes}})


@pytest.fixture(scope="module")
def unique_folder(tmp_path_factory):
    """One image per class, so a label identifies an image (for coverage checks)."""
    root = tmp_path_factory.mktemp("unique")
    classes = {f"c{k:02d}": 1 for k in range(11)}
    return _write_folder(root, {"train": classes, "val": classes}, seed=1)


def _cfg(data, backend, tmp_path, **kw):
    base = dict(data=data, loader=backend, batch_size=4, num_workers=0, image_size=32, local_size=16,
                num_local_crops=2, cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return DataConfig(**base)


def _check_batch(x, size, batch, dtype=torch.float32):
    assert x.dtype == dtype and x.device.type == "cpu"
    assert tuple(x.shape) == (batch, 3, size, size)
    assert torch.isfinite(x).all()
    assert x.min().item() >= LO - 1e-4 and x.max().item() <= HI + 1e-4
    # Not a constant: real pixels went through.
    assert x.std().item() > 0.05


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, ranges


@pytest.mark.parametrize("backend", BACKENDS)
def test_multicrop_shapes_dtypes_ranges(folder, backend, tmp_path):
    cfg = _cfg(folder, backend, tmp_path)
    loader = make_loader(cfg, "train", "multicrop")
    assert loader.backend == backend
    assert loader.num_classes == 4 and loader.num_samples == 20 and loader.bad_files == 0
    assert len(loader) == 20 // 4
    batches = 0
    for crops, labels in loader:
        assert len(crops) == 2 + cfg.num_local_crops
        for k, crop in enumerate(crops):
            _check_batch(crop, cfg.image_size if k < 2 else cfg.local_size, 4)
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert 0 <= labels.min() and labels.max() < 4
        batches += 1
    assert batches == len(loader)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pipeline,three_augment", [("supervised", False), ("supervised", True), ("eval", False)])
def test_supervised_and_eval_shapes(folder, backend, pipeline, three_augment, tmp_path):
    cfg = _cfg(folder, backend, tmp_path, three_augment=three_augment, image_size=24)
    loader = make_loader(cfg, "val", pipeline)
    seen = []
    for images, labels in loader:
        # eval keeps the partial last batch (12 images = 4 + 4 + 4 here, all full)
        _check_batch(images, 24, labels.shape[0])
        assert labels.dtype == torch.int64
        seen.append(labels)
    assert torch.cat(seen).numel() == 12
    if pipeline == "eval":  # not shuffled: files in class order
        assert torch.cat(seen).tolist() == sorted(torch.cat(seen).tolist())


@needs_dali
def test_eval_partial_last_batch(folder, tmp_path):
    for backend in ("dali", "torch"):
        loader = make_loader(_cfg(folder, backend, tmp_path, batch_size=5), "val", "eval")
        sizes = [labels.shape[0] for _, labels in loader]
        assert sizes == [5, 5, 2] and len(loader) == 3


# ---------------------------------------------------------------------------------------------
# same semantics under both backends


@needs_dali
def test_eval_pipeline_matches_between_backends(folder, tmp_path):
    """Eval is deterministic: the same images must come out (nearly) the same from both."""
    out = {}
    for backend in ("dali", "torch"):
        loader = make_loader(_cfg(folder, backend, tmp_path, batch_size=6), "val", "eval")
        out[backend] = torch.cat([x for x, _ in loader])
    d, t = out["dali"], out["torch"]
    # Per image and channel, mean and std agree (resampling filters differ slightly).
    torch.testing.assert_close(d.mean(dim=(2, 3)), t.mean(dim=(2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(d.std(dim=(2, 3)), t.std(dim=(2, 3)), atol=0.01, rtol=0)
    assert (d - t).abs().mean().item() < 0.01


@needs_dali
def test_multicrop_statistics_match_between_backends(folder, tmp_path):
    """Random views differ per backend, but their distributions must agree.  Both backends read the
    same images in the same order (shared shard plan); per crop type, the per-view channel means and
    standard deviations are compared with a two-sample z-test (4 standard errors)."""
    stats = {}
    for backend in ("dali", "torch"):
        loader = make_loader(_cfg(folder, backend, tmp_path, batch_size=10, num_local_crops=1), "train", "multicrop")
        acc = [[] for _ in range(3)]
        for epoch in range(4):
            loader.set_epoch(epoch)
            for crops, _ in loader:
                for k, c in enumerate(crops):
                    acc[k].append(torch.cat([c.mean(dim=(2, 3)), c.std(dim=(2, 3))], dim=1))
        stats[backend] = [torch.cat(a).double() for a in acc]  # [views, 6]: 3 means, 3 stds
    for k in range(3):
        d, t = stats["dali"][k], stats["torch"][k]
        se = (d.var(dim=0) / len(d) + t.var(dim=0) / len(t)).sqrt()
        z = (d.mean(dim=0) - t.mean(dim=0)).abs() / se
        assert (z < 4).all(), (k, z)


def _run_dali_on(images_hwc, build):
    """Run ``build(graph, images)`` on a batch of uint8 HWC arrays in a CPU-only DALI pipeline."""
    from nvidia.dali import Pipeline, fn

    from fastmask.data.dali_loader import _Graph

    pipe = Pipeline(batch_size=len(images_hwc), num_threads=1, device_id=None, seed=1234)
    with pipe:
        x = fn.external_source(source=lambda: list(images_hwc), batch=True, layout="HWC")
        pipe.set_outputs(build(_Graph(gpu=False), x))
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(images_hwc))]


def _chw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


@needs_dali
@pytest.mark.parametrize("b,c,s,h", [(1.3, 1.0, 1.0, 0.0), (1.0, 0.6, 1.0, 0.0), (1.0, 1.0, 0.0, 0.0),
                                     (0.7, 1.35, 1.15, 31.0), (1.1, 0.8, 0.85, -22.5)])
def test_color_twist_matches_dali(b, c, s, h):
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    (dali,) = _run_dali_on([img], lambda g, x: g.color_twist(x, b, c, s, h))
    ours = augment.color_twist(_chw(img), b, c, s, h).permute(1, 2, 0).numpy()
    assert np.abs(dali.astype(int) - ours.astype(int)).max() <= 1  # rounding only


@needs_dali
@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.6, 2.0])
def test_blur_and_solarize_match_dali(sigma):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (21, 19, 3), dtype=np.uint8)
    (blurred,) = _run_dali_on([img], lambda g, x: g.fn.gaussian_blur(x, sigma=sigma))
    ours = augment.gaussian_blur(_chw(img), sigma).permute(1, 2, 0).numpy()
    assert np.abs(blurred.astype(int) - ours.astype(int)).max() <= 1
    (sol,) = _run_dali_on([img], lambda g, x: g.solarize(x, 1.0))
    assert np.array_equal(sol, augment.solarize(_chw(img)).permute(1, 2, 0).numpy())
    # "off" settings are exact identities in the DALI graph.
    (same,) = _run_dali_on([img], lambda g, x: g.fn.gaussian_blur(x, sigma=augment.NO_BLUR_SIGMA))
    assert np.array_equal(same, img)


@needs_dali
def test_grayscale_and_solarize_probabilities_agree():
    """Per-sample random decisions happen at the documented rates in both backends."""
    n = 400
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img[..., 0] = 255 - img[..., 1]  # strongly coloured: channels never equal
    jitter = augment.ColorJitterSpec()
    outs = _run_dali_on([img] * n, lambda g, x: g.jitter(x, jitter))
    dali_gray = np.mean([np.abs(o[..., 0].astype(int) - o[..., 1]).max() <= 1 for o in outs])
    outs = _run_dali_on([img] * n, lambda g, x: g.solarize(x, 0.2))
    dali_sol = np.mean([not np.array_equal(o, img) for o in outs])
    g = torch.Generator().manual_seed(0)
    torch_gray = np.mean([augment.sample_jitter(jitter, g)[2] == 0.0 for _ in range(n)])
    torch_jitter = np.mean([augment.sample_jitter(jitter, g)[0] != 1.0 for _ in range(n)])
    for rate, expected in ((dali_gray, 0.2), (dali_sol, 0.2), (torch_gray, 0.2), (torch_jitter, 0.8)):
        assert abs(rate - expected) < 0.07, (rate, expected)  # > 3 binomial std at n=400


# ---------------------------------------------------------------------------------------------
# sharding and epochs


@pytest.mark.parametrize("n", [1, 7, 11, 64])
@pytest.mark.parametrize("num_shards", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_plan_partitions(n, num_shards, drop_last):
    plans = [ShardPlan(n, 1, k, num_shards, seed=5, shuffle=True, drop_last=drop_last)
             for k in range(num_shards)] if (n // num_shards or not drop_last) else []
    if not plans:
        with pytest.raises(DatasetError):
            ShardPlan(n, 1, 0, num_shards, drop_last=True)
        return
    parts = [p.indices(epoch=2) for p in plans]
    joined = np.concatenate(parts)
    assert len(set(joined.tolist())) == len(joined)  # no overlap
    if drop_last:
        assert len({len(p) for p in parts}) == 1 and len(joined) == n - n % num_shards
    else:
        assert sorted(joined.tolist()) == list(range(n))  # full coverage
    assert [len(p) for p in parts] == [len(p) for p in plans]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_shards_cover_dataset_without_overlap(unique_folder, backend, tmp_path):
    cfg = _cfg(unique_folder, backend, tmp_path, batch_size=2, num_local_crops=1)
    seen = []
    for shard in range(3):
        loader = make_loader(cfg, "train", "multicrop", shard_id=shard, num_shards=3, seed=9,
                             drop_last=False, shuffle=True)
        loader.set_epoch(4)
        labels = torch.cat([y for _, y in loader]).tolist()
        assert len(loader) == -(-len(labels) // 2)
        seen.append(labels)
    flat = sum(seen, [])
    assert sorted(flat) == list(range(11))  # every image once, no overlap
    # Training defaults (drop_last) give every shard the same number of batches.
    lens = {len(make_loader(cfg, "train", "multicrop", shard_id=k, num_shards=3)) for k in range(3)}
    assert lens == {1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_is_deterministic(folder, backend, tmp_path):
    cfg = _cfg(folder, backend, tmp_path, num_local_crops=1)

    def epoch_batches(loader, epoch):
        loader.set_epoch(epoch)
        return [(torch.cat([c.flatten() for c in crops]), y) for crops, y in loader]

    a = make_loader(cfg, "train", "multicrop", seed=3)
    b = make_loader(cfg, "train", "multicrop", seed=3)
    e1a, e1b = epoch_batches(a, 1), epoch_batches(b, 1)
    assert all(torch.equal(x, y) and torch.equal(l, m) for (x, l), (y, m) in zip(e1a, e1b))
    e2 = epoch_batches(a, 2)
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(e1a, e2))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(epoch_batches(a, 1), e1a))  # replayable
    if backend == "torch":  # per-sample generators: worker count does not change the data
        w = make_loader(_cfg(folder, backend, tmp_path, num_local_crops=1, num_workers=1),
                        "train", "multicrop", seed=3)
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(epoch_batches(w, 1), e1a))


# ---------------------------------------------------------------------------------------------
# bad data


def _corrupt_folder(root):
    _write_folder(root, {"train": {"a": 4, "b": 4, "empty": 0}, "val": {"a": 2, "b": 2}}, seed=4)
    good = open(os.path.join(root, "train", "a", "0.jpg"), "rb").read()
    with open(os.path.join(root, "train", "a", "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(root, "train", "b", "garbage.jpg"), "wb") as f:
        f.write(os.urandom(300))
    with open(os.path.join(root, "train", "b", "notes.txt"), "w") as f:
        f.write("not an image")
    open(os.path.join(root, "train", "a", "empty.jpg"), "wb").close()
    return str(root)


def test_check_image_file_reasons(tmp_path):
    root = _corrupt_folder(tmp_path / "d")
    assert check_image_file(os.path.join(root, "train", "a", "1.jpg")) is None
    assert "truncated" in check_image_file(os.path.join(root, "train", "a", "truncated.jpg"))
    assert "signature" in check_image_file(os.path.join(root, "train", "b", "garbage.jpg"))
    assert "extension" in check_image_file(os.path.join(root, "train", "b", "notes.txt"))
    assert "empty" in check_image_file(os.path.join(root, "train", "a", "empty.jpg"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_are_skipped_and_counted(tmp_path, backend):
    root = _corrupt_folder(tmp_path / "d")
    cfg = _cfg(root, backend, tmp_path, batch_size=2, num_local_crops=1)
    with pytest.warns(UserWarning) as record:
        loader = make_loader(cfg, "train", "multicrop", drop_last=False)
    messages = [str(w.message) for w in record]
    # notes.txt is not data (ignored, not "bad"); the three broken images are.
    assert any("skipping 3 bad file" in m for m in messages), messages
    assert not any("notes.txt" in m for m in messages), messages
    assert any("no usable images: empty" in m for m in messages), messages
    assert loader.bad_files == 3 and loader.num_samples == 8 and loader.split.ignored == 1
    assert loader.num_classes == 3  # the empty class folder keeps its label id
    labels = torch.cat([y for _, y in loader])
    assert labels.numel() == 8 and set(labels.tolist()) == {0, 1}


def _png_with_corrupt_data():
    """A PNG whose signature, header and IEND are intact but whose pixel data is garbage: it passes
    the cheap check and fails to decode, as a bad image does mid-epoch."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 40
    for k in range(start, start + 160):
        data[k] ^= 0x5A
    return bytes(data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_file_mid_epoch_is_skipped(tmp_path, backend):
    root = _write_folder(tmp_path / "d", {"train": {"a": 5, "b": 5}}, seed=6)
    bad = os.path.join(root, "train", "b", "zz_bad.png")
    with open(bad, "wb") as f:
        f.write(_png_with_corrupt_data())
    assert check_image_file(bad, "header") is None and check_image_file(bad, "full") is not None
    cfg = _cfg(root, backend, tmp_path, batch_size=3, num_local_crops=1)
    loader = make_loader(cfg, "train", "multicrop", drop_last=False, shuffle=False)
    assert loader.bad_files == 0 and loader.num_samples == 11
    with pytest.warns(UserWarning, match="zz_bad.png"):
        got = sum(y.numel() for _, y in loader)
    assert got == 10 and loader.bad_files == 1
    # The next epoch knows the file is bad and still runs to the end.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(y.numel() for _, y in loader) == 10
    assert loader.bad_files == 1


def test_unusable_datasets_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader(_cfg(str(tmp_path / "missing"), "torch", tmp_path), "train", "eval")
    (tmp_path / "nosplit").mkdir()
    with pytest.raises(FileNotFoundError, match="split directory"):
        make_loader(_cfg(str(tmp_path / "nosplit"), "torch", tmp_path), "train", "eval")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders"):
        make_loader(_cfg(str(tmp_path / "noclass"), "torch", tmp_path), "train", "eval")
    d = tmp_path / "allbad" / "train" / "a"
    d.mkdir(parents=True)
    (d / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no usable images"):
        make_loader(_cfg(str(tmp_path / "allbad"), "torch", tmp_path), "train", "eval")
    root = _write_folder(tmp_path / "small", {"train": {"a": 3}})
    with pytest.raises(DatasetError, match="fewer than batch_size"):
        make_loader(_cfg(root, "torch", tmp_path, batch_size=8), "train", "supervised")
    with pytest.raises(ValueError, match="pipeline"):
        make_loader(_cfg(root, "torch", tmp_path), "train", "mixup")
    with pytest.raises(ValueError, match="loader"):
        make_loader(_cfg(root, "jax", tmp_path), "train", "eval")


@pytest.mark.parametrize("field, value, message", [
    ("loader", "gpu", "loader: must be one of dali, torch, auto, got 'gpu'"),
    ("batch_size", 0, "batch_size: must be >= 1, got 0"),
    ("local_size", 0, "local_size: must be >= 1, got 0"),
    ("num_workers", -1, "num_workers: must be >= 0, got -1"),
    ("num_local_crops", -2, "num_local_crops: must be >= 0, got -2"),
    ("local_scale", (0.5, 0.2), "local_scale: must be [lo, hi] with 0 < lo <= hi <= 1, got [0.5, 0.2]"),
    ("eval_crop_pct", 1.5, "eval_crop_pct: must be in (0, 1], got 1.5"),
    ("validate", "maybe", "validate: must be one of header, full, none, got 'maybe'"),
])
def test_one_data_config_check_serves_make_loader_and_the_preflight(tmp_path, field, value, message):
    """make_loader and the training preflight run the same check: the same message, the preflight's
    with the config section in front (and as a one-line UsageError)."""
    from fastmask._cli import UsageError
    from fastmask.config import load_config
    from fastmask.engine.preflight import _check_data_section

    cfg = DataConfig(data=str(tmp_path / "never_read"), **{field: value})
    with pytest.raises(ValueError) as direct:
        make_loader(cfg, "train", "eval")
    assert str(direct.value) == message
    train_cfg = load_config()
    train_cfg.data = cfg
    with pytest.raises(UsageError) as preflight:
        _check_data_section(train_cfg)
    assert str(preflight.value) == "data." + message
    assert not (tmp_path / "never_read").exists()


def test_dali_asked_for_but_missing_is_one_check(tmp_path, monkeypatch):
    import fastmask.data as data_pkg
    from fastmask._cli import UsageError
    from fastmask.config import load_config
    from fastmask.engine.preflight import _check_data_section

    monkeypatch.setattr(data_pkg, "dali_available", lambda: False)
    cfg = DataConfig(data=str(tmp_path), loader="dali")
    with pytest.raises(RuntimeError, match=r"^loader=dali: nvidia.dali cannot be imported; .* or use loader=torch$"):
        make_loader(cfg, "train", "eval")
    train_cfg = load_config()
    train_cfg.data = cfg
    with pytest.raises(UsageError, match=r"^data.loader=dali: nvidia.dali cannot be .* use data.loader=torch$"):
        _check_data_section(train_cfg)


def test_validation_is_cached(tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}})
    cache = str(tmp_path / "cache")
    first = scan_image_folder(root, "train", cache_dir=cache)
    import fastmask.data.folder as folder_mod

    def boom(*a, **k):
        raise AssertionError("file re-validated despite an up-to-date cache entry")

    monkeypatch.setattr(folder_mod, "check_image_file", boom)
    second = scan_image_folder(root, "train", cache_dir=cache)
    assert second.files == first.files and second.labels == first.labels
    # A changed file is checked again.
    with open(os.path.join(root, "train", "a", "0.jpg"), "ab") as f:
        f.write(b"\x00")
    with pytest.raises(AssertionError, match="re-validated"):
        scan_image_folder(root, "train", cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# built-in datasets


def test_builtin_shapes_generated_once_and_reused(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    root = builtin.ensure_builtin("shapes", cache)
    manifest = os.path.join(root, "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    train = scan_image_folder(root, "train")
    val = scan_image_folder(root, "val")
    assert train.classes == sorted(builtin.SHAPE_CLASSES) and len(train) == 1000 and len(val) == 200
    assert not train.bad_files
    sizes = {Image.open(f).size for f in train.files[::50]}
    assert all(64 <= w <= 224 and 64 <= h <= 224 for w, h in sizes) and len(sizes) > 1
    assert Image.open(train.files[0]).format == "JPEG"
    # No temporary directories left behind.
    assert os.listdir(os.path.dirname(root)) == [os.path.basename(root)]

    def boom(out):
        raise AssertionError("regenerated")

    monkeypatch.setitem(builtin._GENERATORS, "shapes", boom)
    assert builtin.ensure_builtin("shapes", cache) == root
    assert os.stat(manifest).st_mtime_ns == stamp
    loader = make_loader(DataConfig(data="builtin:shapes", loader="torch", cache_dir=cache, batch_size=8,
                                    num_workers=0, image_size=32), "val", "eval")
    assert loader.num_classes == 10 and loader.num_samples == 200


def test_builtin_generation_is_atomic(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")

    def crash(out):
        os.makedirs(os.path.join(out, "train", "circle"))
        Image.new("RGB", (64, 64)).save(os.path.join(out, "train", "circle", "0.jpg"))
        raise KeyboardInterrupt  # a crash half-way through

    monkeypatch.setitem(builtin._GENERATORS, "shapes", crash)
    with pytest.raises(KeyboardInterrupt):
        builtin.ensure_builtin("shapes", cache)
    parent = os.path.join(cache, "builtin")
    assert os.listdir(parent) == []  # neither a half dataset nor a temp dir


def test_builtin_digits(tmp_path):
    root = builtin.ensure_builtin("digits", str(tmp_path / "cache"))
    train, val = scan_image_folder(root, "train"), scan_image_folder(root, "val")
    assert train.classes == [str(d) for d in range(10)] and val.classes == train.classes
    assert len(train) + len(val) == 1797 and len(val) == 1797 // 5
    im = Image.open(train.files[0])
    assert im.size == (64, 64) and im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.max() > 128 and arr.min() < 64  # a digit on a dark background, not a blank


def test_builtin_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        make_loader(_cfg("builtin:imagenet", "torch", tmp_path), "train", "eval")


# ---------------------------------------------------------------------------------------------
# GPU: DALI with device="mixed" (nvJPEG decode, augmentation on the GPU)


@pytest.mark.gpu
@needs_dali
def test_gpu_mixed_decoding_pipelines(folder, tmp_path):
    device = torch.device("cuda")
    cfg = _cfg(folder, "dali", tmp_path)
    loader = make_loader(cfg, "train", "multicrop", device=device)
    for crops, labels in loader:
        assert labels.device.type == "cuda" and labels.dtype == torch.int64
        for k, crop in enumerate(crops):
            size = cfg.image_size if k < 2 else cfg.local_size
            assert crop.device.type == "cuda" and tuple(crop.shape) == (4, 3, size, size)
            assert torch.isfinite(crop).all() and crop.min() >= LO - 1e-4 and crop.max() <= HI + 1e-4
    for three in (False, True):
        sup = make_loader(_cfg(folder, "dali", tmp_path, three_augment=three), "val", "supervised", device=device)
        images, labels = next(iter(sup))
        assert images.is_cuda and images.shape == (4, 3, 32, 32)
    # nvJPEG and libjpeg-turbo differ in the last bits (IDCT, chroma upsampling): looser than on CPU.
    gpu = torch.cat([x.cpu() for x, _ in make_loader(cfg, "val", "eval", device=device)])
    cpu = torch.cat([x for x, _ in make_loader(_cfg(folder, "torch", tmp_path), "val", "eval")])
    assert (gpu - cpu).abs().mean().item() < 0.03
    torch.testing.assert_close(gpu.mean(dim=(2, 3)), cpu.mean(dim=(2, 3)), atol=0.02, rtol=0)


def test_full_validation_catches_truncated_jpeg_with_end_marker(tmp_path):
    """A JPEG cut short and given an end-of-image marker passes PIL's decode (libjpeg pads it with
    grey): the header check cannot see it, the full check must."""
    root = _write_folder(tmp_path / "d", {"train": {"a": 2}}, seed=8)
    good = os.path.join(root, "train", "a", "0.jpg")
    data = open(good, "rb").read()
    bad = os.path.join(root, "train", "a", "cut.jpg")
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2] + b"\xff\xd9")
    assert check_image_file(bad, "header") is None
    reason = check_image_file(bad, "full")
    assert reason is not None and "corrupt JPEG" in reason, reason
    assert check_image_file(good, "full") is None


def test_hidden_and_non_image_files_are_ignored_and_skips_reported_once(tmp_path):
    from fastmask.data.folder import scan_image_folder

    root = _write_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}}, seed=9)
    for name in (".DS_Store", "notes.txt", "._0.jpg"):
        with open(os.path.join(root, "train", "a", name), "wb") as f:
            f.write(b"junk")
    (tmp_path / "d" / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.warns(UserWarning, match="skipping 1 bad file") as record:
        split = scan_image_folder(root, "train")
    assert split.ignored == 3 and len(split.bad_files) == 1 and len(split) == 6
    assert not any(".DS_Store" in str(w.message) or "notes.txt" in str(w.message) for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same split scanned again (each evaluation) stays quiet
        again = scan_image_folder(root, "train")
    assert len(again.bad_files) == 1


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from fastmask.data.torch_loader import decode_rgb

    grey = np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64)
    path = str(tmp_path / "deep.png")
    Image.fromarray(grey).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    img = decode_rgb(path)
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 64)
    expected = torch.from_numpy((grey.astype(np.int64) // 257).astype(np.uint8))
    assert torch.equal(img[0], expected) and torch.equal(img[1], img[0])
    assert len(torch.unique(img)) > 200  # clipping left 9 grey levels

def test_builtin_objects_options_sizes_and_footprint(tmp_path):
    cache = str(tmp_path / "cache")
    root = builtin.ensure_builtin("objects,res=48,train=3,val=2", cache)
    assert os.path.basename(root) == "objects-res48-train3-val2-v2"
    train, val = scan_image_folder(root, "train"), scan_image_folder(root, "val")
    assert train.classes == sorted(builtin.OBJECT_CLASSES) and len(train) == 30 and len(val) == 20
    assert {Image.open(f).size for f in train.files} == {(48, 48)}
    # Growing a split keeps the images already in it (one generator per split and class).
    bigger = builtin.ensure_builtin("objects,res=48,train=4,val=2", cache)
    a = os.path.join("train", "star", "00001.jpg")
    assert open(os.path.join(root, a), "rb").read() == open(os.path.join(bigger, a), "rb").read()
    # The object covers part of the image only, and differs from the background it covers.
    rng = np.random.default_rng(0)
    for cls in builtin.OBJECT_CLASSES:
        img, mask = builtin._draw_object_scene(cls, 64, rng)
        assert img.shape == (64, 64, 3) and 0.02 < mask.mean() < 0.4, (cls, mask.mean())
        patches = mask.reshape(8, 8, 8, 8).any(axis=(1, 3)).sum()
        assert 4 <= patches <= 40, (cls, patches)
    # Default shapes keep their historical folder; options make a new one.
    assert os.path.basename(builtin.builtin_root("shapes", cache)) == "shapes-v2"
    assert os.path.basename(builtin.builtin_root("shapes,val=5", cache)) == "shapes-train100-val5-v2"
    for bad, msg in (("objects,size=3", "bad option"), ("objects,res=abc", "integer"),
                     ("objects,res=8", r"\[32, 512\]"), ("digits,train=3", "bad option")):
        with pytest.raises(ValueError, match=msg):
            builtin.parse_builtin(bad)
