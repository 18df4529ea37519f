"""Input pipelines: DALI (GPU decode + multi-crop) with a torchvision fallback, and built-in data.

    from fastmask.data import DataConfig, make_loader
    loader = make_loader(DataConfig(data="builtin:shapes"), split="train", pipeline="multicrop")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for crops, labels in loader: ...

Pipelines (same semantics under ``loader="dali"`` and ``loader="torch"``, see ``augment.py``):

``multicrop``   DINO/iBOT views: 2 global crops (``image_size``, scale ``global_scale``) then
                ``num_local_crops`` local crops (``local_size``, scale ``local_scale``); flip,
                colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 1.0 / 0.1 / 0.5),
                solarisation (p 0.2, second global crop).  Yields ``(crops, labels)``, crops a list
                of float tensors ``[B, 3, H, W]``, globals first.
``supervised``  random resized crop (scale ``supervised_scale``) + flip, optionally DeiT-III
                3-Augment.  Yields ``(images [B,3,H,W], labels [B] int64)``.
``eval``        resize the shorter side to ``image_size / eval_crop_pct``, centre crop.

All outputs are normalised with the ImageNet mean/std and placed on ``device``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from . import augment
from .builtin import BUILTIN_DATASETS, ensure_builtin
from .dali_loader import DaliLoader, dali_available
from .folder import VALIDATE_MODES, DatasetError, ImageFolderSplit, ShardPlan, check_image_file, scan_image_folder
from .torch_loader import TorchLoader
from .webdataset import is_shard_split, write_shards

__all__ = [
    "DataConfig", "check_data_config", "make_loader", "resolve_data_root", "DatasetError", "dali_available",
    "BUILTIN_DATASETS", "ensure_builtin", "scan_image_folder", "check_image_file", "ImageFolderSplit",
    "ShardPlan", "augment", "write_shards",
]

PIPELINES = ("multicrop", "supervised", "eval")
LOADERS = ("dali", "torch", "auto")


@dataclass
class DataConfig:
    data: str = "builtin:shapes"  # "builtin:shapes" | "builtin:digits" | root with train/ val/ (ImageFolder or .tar shards)
    loader: str = "auto"  # "dali" | "torch" | "auto" (DALI on a GPU when importable, else torch)
    batch_size: int = 64  # per process
    num_workers: int = 2  # DataLoader workers, or DALI CPU threads
    image_size: int = 224  # global crop / supervised crop / eval crop size
    local_size: int = 96
    # DINO's main_dino.py defaults (8 local crops, global (0.4, 1), local (0.05, 0.4)); iBOT and AttMask
    # use 10 local crops with (0.25, 1) / (0.05, 0.25): their recipes set these explicitly.
    num_local_crops: int = 8
    global_scale: Tuple[float, float] = (0.4, 1.0)
    local_scale: Tuple[float, float] = (0.05, 0.4)
    three_augment: bool = False  # DeiT-III 3-Augment for supervised training
    cache_dir: str = "~/.cache/fastmask"  # built-in datasets and the file-validation cache
    supervised_scale: Tuple[float, float] = (0.08, 1.0)
    eval_crop_pct: float = 0.875
    validate: str = "header"  # "header" (cheap, cached) | "full" (PIL decode, cached) | "none"


def resolve_data_root(cfg: DataConfig) -> str:
    """The ImageFolder root for ``cfg.data``, generating a built-in dataset on first use."""
    if cfg.data.startswith("builtin:"):
        return ensure_builtin(cfg.data.split(":", 1)[1], cfg.cache_dir)
    return os.path.expanduser(cfg.data)


def check_data_config(cfg: DataConfig, prefix: str = "") -> None:
    """Every field of ``cfg`` in range, or a one-line ValueError naming it (``prefix`` + field:
    what it must be, what it is); RuntimeError when ``loader=dali`` cannot be imported.  The
    training preflight runs it with ``prefix="data."``, ``make_loader`` with none."""
    if cfg.loader not in LOADERS:
        raise ValueError(f"{prefix}loader: must be one of {', '.join(LOADERS)}, got {cfg.loader!r}")
    if cfg.loader == "dali" and not dali_available():
        raise RuntimeError(f"{prefix}loader=dali: nvidia.dali cannot be imported; install nvidia-dali-cuda120 "
                           f"or use {prefix}loader=torch")
    for name in ("batch_size", "image_size", "local_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{prefix}{name}: must be >= 1, got {getattr(cfg, name)}")
    for name in ("num_workers", "num_local_crops"):
        if int(getattr(cfg, name)) < 0:
            raise ValueError(f"{prefix}{name}: must be >= 0, got {getattr(cfg, name)}")
    for name in ("global_scale", "local_scale", "supervised_scale"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{prefix}{name}: must be [lo, hi] with 0 < lo <= hi <= 1, got [{lo}, {hi}]")
    if not 0 < cfg.eval_crop_pct <= 1:
        raise ValueError(f"{prefix}eval_crop_pct: must be in (0, 1], got {cfg.eval_crop_pct}")
    if cfg.validate not in VALIDATE_MODES:
        raise ValueError(f"{prefix}validate: must be one of {', '.join(VALIDATE_MODES)}, got {cfg.validate!r}")


def _specs(cfg: DataConfig, pipeline: str):
    if pipeline == "multicrop":
        return augment.multicrop_specs(cfg.image_size, cfg.local_size, cfg.num_local_crops,
                                       cfg.global_scale, cfg.local_scale)
    if pipeline == "supervised":
        three = augment.ThreeAugmentSpec() if cfg.three_augment else None
        return augment.SupervisedSpec(cfg.image_size, tuple(cfg.supervised_scale), three)
    return augment.EvalSpec(cfg.image_size, cfg.eval_crop_pct)


def make_loader(
    cfg: DataConfig,
    split: str = "train",
    pipeline: str = "multicrop",
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    device: Optional[Union[torch.device, str]] = None,
    drop_last: Optional[bool] = None,
    shuffle: Optional[bool] = None,
) -> Union[DaliLoader, TorchLoader]:
    """An iterable over batches of ``split`` for this shard; see the module docstring.

    ``drop_last``/``shuffle`` default to True for the training pipelines and False for ``eval``.
    The loader has ``len`` (batches per epoch for this shard), ``set_epoch(epoch)``,
    ``num_classes``, ``num_samples`` (usable images in the split, all shards), ``backend``
    ("dali"/"torch") and ``bad_files`` (files skipped so far).
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    check_data_config(cfg)
    device = torch.device(device if device is not None else "cpu")
    training = pipeline != "eval"
    drop_last = training if drop_last is None else bool(drop_last)
    shuffle = training if shuffle is None else bool(shuffle)

    backend = cfg.loader
    if backend == "auto":
        # DALI pays off with nvJPEG decoding and GPU augmentation; its CPU operators measured about
        # 0.5x the torchvision pipeline's images/s here (bench/bench_data.py), so the CPU uses torch.
        backend = "dali" if device.type == "cuda" and dali_available() else "torch"

    root = resolve_data_root(cfg)
    if is_shard_split(root, split):  # webdataset .tar shards (fastmask/data/webdataset.py)
        from . import webdataset as wds

        data = wds.scan_shards(root, split)
        plan = ShardPlan.of_tars(data.shard_sizes, int(cfg.batch_size), int(shard_id), int(num_shards), int(seed),
                                 shuffle, drop_last)
        cls = wds.DaliShardLoader if backend == "dali" else wds.TorchShardLoader
        return cls(data, pipeline, _specs(cfg, pipeline), plan, num_workers=int(cfg.num_workers),
                   seed=int(seed), device=device)
    data = scan_image_folder(root, split, validate=cfg.validate, cache_dir=cfg.cache_dir)
    plan = ShardPlan(len(data), int(cfg.batch_size), int(shard_id), int(num_shards), int(seed), shuffle, drop_last)
    cls = DaliLoader if backend == "dali" else TorchLoader
    return cls(data, pipeline, _specs(cfg, pipeline), plan, num_workers=int(cfg.num_workers),
               seed=int(seed), device=device)
