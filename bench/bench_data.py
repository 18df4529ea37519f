"""Input-pipeline throughput: DALI vs torchvision ``DataLoader`` for DINO multi-crop.

Both loaders read the same ImageFolder of JPEGs (ImageNet-like sizes, 300-500 px) and produce the
same views: 2 global crops at 224 px and 6 local crops at 96 px with flip, colour jitter,
grayscale, blur and solarisation, normalised, on the target device.  One timed call is one full
epoch (loader start-up included: the DataLoader starts its workers, DALI builds its pipeline).
``benchmark.extra_info`` records images/s, crops/s and, for DALI, the ratio to torchvision, for the
whole epoch and for the steady stream after the first batch (start-up is recorded on its own: DALI
builds a pipeline per epoch, for that epoch's shuffled shard, which a 128-image epoch cannot hide).

CPU: 128 images, 2 DataLoader workers vs 2 DALI CPU threads (``device_id=None``), so the CPU
comparison is at a fixed worker count.  GPU: 1024 images, DALI decodes with ``device="mixed"``
(nvJPEG) and augments on the GPU; the DataLoader uses 8 workers and pinned memory.

    .venv/bin/python -m pytest bench/bench_data.py --benchmark-json bench/results/data-$(hostname).json
"""
import os
import time

import numpy as np
import pytest

from common import DEVICE, HAS_CUDA, sync
from fastmask.data import DataConfig, dali_available, make_loader

if HAS_CUDA:
    NUM_IMAGES, BATCH, WORKERS, ROUNDS, WARMUP = 1024, 64, 8, 5, 1
else:
    NUM_IMAGES, BATCH, WORKERS, ROUNDS, WARMUP = 128, 16, 2, 3, 1
GLOBAL, LOCAL, NUM_LOCAL = 224, 96, 6
LOADERS = ("torch", "dali")  # torch first: the DALI case records the ratio to it

_IMAGES_PER_S = {}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("bench_data")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        cls = f"class{i % 8}"
        os.makedirs(root / "train" / cls, exist_ok=True)
        h, w = (int(v) for v in rng.integers(300, 500, 2))
        # Smooth colour field plus noise: compresses like a photo rather than flat colour.
        yy, xx = np.mgrid[0:h, 0:w] / 400.0
        img = rng.uniform(0, 255, 3) + yy[..., None] * rng.uniform(-150, 150, 3) + xx[..., None] * rng.uniform(-150, 150, 3)
        img += rng.normal(0, 20, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "train" / cls / f"{i}.jpg", quality=90)
    return str(root)


@pytest.mark.parametrize("backend", LOADERS)
def test_multicrop_loader_throughput(benchmark, image_folder, backend, tmp_path):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia.dali is not importable here")
    cfg = DataConfig(data=image_folder, loader=backend, batch_size=BATCH, num_workers=WORKERS,
                     image_size=GLOBAL, local_size=LOCAL, num_local_crops=NUM_LOCAL,
                     cache_dir=str(tmp_path / "cache"))
    loader = make_loader(cfg, "train", "multicrop", device=DEVICE)
    images = len(loader) * BATCH
    state = {"epoch": 0}

    def one_epoch():
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        n = 0
        start = time.perf_counter()
        for crops, labels in loader:
            if n == 0:
                sync()
                first = time.perf_counter()
                first_n = labels.numel()
            n += labels.numel()
        sync()
        end = time.perf_counter()
        assert n == images and len(crops) == 2 + NUM_LOCAL
        # Start-up (workers / pipeline build + the first batch) apart from the steady stream after it.
        state.setdefault("startup", []).append(first - start)
        state.setdefault("steady", []).append((n - first_n) / (end - first))
        return n

    benchmark.pedantic(one_epoch, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    seconds = benchmark.stats.stats.median
    rate = images / seconds
    timed_rounds = slice(WARMUP, None)
    steady = float(np.median(state["steady"][timed_rounds]))
    _IMAGES_PER_S[backend] = (rate, steady)
    benchmark.extra_info.update(
        backend=backend,
        device=str(DEVICE),
        decode="mixed (nvJPEG)" if backend == "dali" and HAS_CUDA else "cpu",
        workers=WORKERS,
        batch_size=BATCH,
        images_per_epoch=images,
        views=f"2x{GLOBAL} + {NUM_LOCAL}x{LOCAL}",
        images_per_s=round(rate, 2),
        crops_per_s=round(rate * (2 + NUM_LOCAL), 2),
        startup_s_median=round(float(np.median(state["startup"][timed_rounds])), 3),
        steady_images_per_s=round(steady, 2),
        cpu_threads=os.cpu_count(),
    )
    if backend == "dali" and "torch" in _IMAGES_PER_S:
        torch_rate, torch_steady = _IMAGES_PER_S["torch"]
        benchmark.extra_info["ratio_vs_torch"] = round(rate / torch_rate, 3)
        benchmark.extra_info["steady_ratio_vs_torch"] = round(steady / torch_steady, 3)
