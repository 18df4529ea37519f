"""The torchvision pipeline: a ``torch.utils.data.DataLoader`` over the validated file list.

Randomness is per sample, from a generator seeded by (seed, epoch, sample index), so a batch does
not depend on the number of workers or on which worker decoded it.  A file that fails to decode
despite validation is dropped from its batch and counted in ``loader.bad_files``; it never stops
the epoch.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from . import augment
from .folder import LoaderBase, ImageFolderSplit, ShardPlan, derive_seed, summarize_bad


def decode_rgb(path: str) -> torch.Tensor:
    """uint8 [3, H, W].  PIL, not ``torchvision.io.decode_image``: the latter can crash the process
    (segfault in libpng) on a corrupt PNG, and one bad file must never end the run."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            # 16-bit grey (PNG/TIFF): PIL's convert("RGB") clips at 255 instead of scaling.
            grey = np.asarray(im, dtype=np.int64)
            arr = np.repeat((np.clip(grey, 0, 65535) // 257).astype(np.uint8)[..., None], 3, axis=2)
        else:
            arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()


class _TransformedFiles(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str], labels: Sequence[int], pipeline: str, specs, seed: int,
                 decode=decode_rgb):
        self.decode = decode
        self.files = list(files)
        self.labels = list(labels)
        self.pipeline = pipeline
        self.specs = specs
        self.seed = seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        index, epoch = key
        try:
            img = self.decode(self.files[index])
        except Exception as e:  # any decode failure: drop the sample, the batch still goes out
            return None, index, f"cannot decode ({type(e).__name__}: {e})"
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index, 0x70C4))
        if self.pipeline == "multicrop":
            out = [augment.apply_crop(img, spec, g) for spec in self.specs]
        elif self.pipeline == "supervised":
            out = augment.apply_supervised(img, self.specs, g)
        else:
            out = augment.apply_eval(img, self.specs)
        return out, self.labels[index]


def _collate(samples):
    good = [s for s in samples if s[0] is not None]
    failed = {s[1]: s[2] for s in samples if s[0] is None}
    if not good:
        return None, None, failed
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    if isinstance(good[0][0], list):
        crops = [torch.stack([s[0][k] for s in good]) for k in range(len(good[0][0]))]
        return crops, labels, failed
    return torch.stack([s[0] for s in good]), labels, failed


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys from the shard plan for the current epoch."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan
        self.epoch = 0

    def __len__(self):
        return len(self.plan)

    def __iter__(self):
        idx = self.plan.indices(self.epoch).tolist()
        b = self.plan.batch_size
        for start in range(0, len(idx), b):
            batch = idx[start : start + b]
            if self.plan.drop_last and len(batch) < b:
                return
            yield [(i, self.epoch) for i in batch]


class TorchLoader(LoaderBase):
    backend = "torch"

    def __init__(self, split: ImageFolderSplit, pipeline: str, specs, plan: ShardPlan, *,
                 num_workers: int, seed: int, device: torch.device, decode=decode_rgb):
        self.split = split
        self.pipeline = pipeline
        self.plan = plan
        self.device = device
        self._sampler = _EpochBatchSampler(plan)
        # decode: file handle -> uint8 [3, H, W] (paths here; tar members for webdataset shards).
        dataset = _TransformedFiles(split.files, split.labels, pipeline, specs, seed, decode)
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            # Workers live as long as the loader (start-up is paid once, not every epoch).
            persistent_workers=num_workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        self._sampler.epoch = int(epoch)

    def __iter__(self):
        non_blocking = self.device.type == "cuda"
        for images, labels, failed in self._loader:
            if failed:
                bad = {self.split.files[i]: reason for i, reason in failed.items()}
                self.split.mark_bad(bad)
                warnings.warn(f"{len(bad)} image(s) failed to decode and were dropped from a batch: "
                              f"{summarize_bad(list(bad.items()))}", stacklevel=2)
            if labels is None:
                continue
            labels = labels.to(self.device, non_blocking=non_blocking)
            if isinstance(images, list):
                yield [c.to(self.device, non_blocking=non_blocking) for c in images], labels
            else:
                yield images.to(self.device, non_blocking=non_blocking), labels
