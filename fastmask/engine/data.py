"""Glue between the engine and ``fastmask.data``'s loaders: building them, epochs, batches."""
from __future__ import annotations

import torch

__all__ = ["make_loader", "set_loader_epoch", "num_classes", "split_batch", "to_device", "batch_size"]


def make_loader(cfg, split: str, pipeline: str, *, shard_id: int, num_shards: int, device: torch.device):
    from ..data import make_loader as _make

    return _make(cfg.data, split, pipeline, shard_id=shard_id, num_shards=num_shards, seed=cfg.seed, device=device)


def set_loader_epoch(loader, epoch: int) -> None:
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn):
            fn(epoch)
            return


def num_classes(loader) -> int:
    for obj in (loader, getattr(loader, "dataset", None)):
        if obj is None:
            continue
        n = getattr(obj, "num_classes", None)
        if n:
            return int(n)
        classes = getattr(obj, "classes", None)
        if classes:
            return len(classes)
    raise RuntimeError("the data loader does not report num_classes/classes")


def split_batch(batch):
    """(inputs, labels) from a loader batch."""
    if isinstance(batch, dict):
        return batch.get("images", batch.get("crops")), batch.get("labels")
    return batch[0], batch[1]


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def batch_size(batch) -> int:
    """Number of images in a batch (not crops)."""
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    while isinstance(first, (list, tuple)):
        first = first[0]
    return int(first.shape[0])
