"""Sharded data: webdataset ``.tar`` shards read by DALI's webdataset reader or by the torchvision path.

Layout (what ``write_shards`` makes from an ImageFolder; any webdataset shards with one image and a
``.cls`` label per sample work too)::

    ROOT/train/train-000000.tar   members 00000000.jpg 00000000.cls 00000001.jpg ...
    ROOT/train/train-000000.idx   DALI's index (``wds2idx`` format: ext offset size name per component)
    ROOT/train/shards.json        classes, samples per shard (written by write_shards; else scanned)
    ROOT/val/...

``data.data`` names ROOT like an ImageFolder root; a split folder holding ``.tar`` files is read as
shards.  The same ``multicrop`` / ``supervised`` / ``eval`` pipelines run on the decoded images.

Splitting and order (``ShardPlan.of_tars``): a *shard* here is a tar file.  Each epoch the tar files are
permuted by (seed, epoch) (not for ``eval``) and dealt to the ranks round-robin, so each rank reads
whole tar files front to back (sequential reads on network storage).  Inside a tar, samples keep their
stored order: write shards from a shuffled list (``write_shards(shuffle_seed=...)``) as webdataset
recommends.  For training (drop_last) every rank yields the same number of full batches (DDP); the
count is fixed across epochs (the samples of the ``S // W`` smallest tars per rank).  Per-sample
augmentation randomness is keyed by the sample's global index, exactly as for an ImageFolder, so shards
written in ImageFolder order give the ImageFolder pipeline's batches (tested).  ``set_start_batch(k)``
resumes an epoch after its first ``k`` batches without reading them (DALI gets an index listing only
the samples still to read).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .folder import DatasetError, ImageFolderSplit, LoaderBase, ShardPlan, derive_seed, scan_image_folder, summarize_bad

__all__ = [
    "IMAGE_EXTS", "MANIFEST", "WebDatasetSplit", "decode_member", "is_shard_split",
    "scan_shards", "write_shards", "TorchShardLoader", "DaliShardLoader",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MANIFEST = "shards.json"
_LABEL_BYTES = 8  # .cls text is padded to this many bytes inside the DALI graph
_READER = "Reader"


# ----------------------------------------------------------------------------------- the split

@dataclass
class WebDatasetSplit(ImageFolderSplit):
    """An ImageFolderSplit whose ``files`` are tar members, ``"<tar>::<offset>:<size>"`` (global
    sample index = position in ``files``), plus where each tar's samples start."""

    shards: List[str] = field(default_factory=list)
    shard_sizes: List[int] = field(default_factory=list)
    index_files: List[Optional[str]] = field(default_factory=list)
    members: List[Tuple[int, int, str, str]] = field(default_factory=list)  # (offset, size, ext, key) per sample

    @property
    def shard_starts(self) -> List[int]:
        return [0] + list(np.cumsum(self.shard_sizes)[:-1]) if self.shard_sizes else []


def is_shard_split(root: str, split: str) -> bool:
    d = os.path.join(root, split)
    return os.path.isdir(d) and any(n.endswith(".tar") for n in os.listdir(d))


def _split_key(name: str) -> Tuple[str, str]:
    base = os.path.basename(name)
    stem, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def _scan_tar(path: str) -> List[Tuple[str, Dict[str, Tuple[int, int]]]]:
    """[(key, {ext: (data offset, size)})] in stored order, from the tar headers only."""
    samples: List[Tuple[str, Dict[str, Tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _split_key(m.name)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = (m.offset_data, m.size)
    return samples


def _read_member(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def scan_shards(root: str, split: str) -> WebDatasetSplit:
    """The samples of ``root/split/*.tar`` (tar headers and .cls members are read, images are not)."""
    d = os.path.join(root, split)
    shards = sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".tar"))
    if not shards:
        raise DatasetError(f"no .tar shards in {d!r}")
    manifest_path = os.path.join(d, MANIFEST)
    manifest = json.load(open(manifest_path)) if os.path.isfile(manifest_path) else {}
    files, labels, members, sizes, idx_files, bad = [], [], [], [], [], []
    for shard in shards:
        n = 0
        for key, comps in _scan_tar(shard):
            image_ext = next((e for e in IMAGE_EXTS if e in comps), None)
            if image_ext is None or "cls" not in comps:
                bad.append((f"{shard}:{key}", f"sample has no image ({'/'.join(IMAGE_EXTS)}) or no .cls component"))
                continue
            try:
                label = int(_read_member(shard, *comps["cls"]).decode().strip())
            except ValueError:
                bad.append((f"{shard}:{key}", "its .cls is not an integer"))
                continue
            off, size = comps[image_ext]
            files.append(f"{shard}::{off}:{size}")
            labels.append(label)
            members.append((off, size, image_ext, key))
            n += 1
        sizes.append(n)
        idx = shard[:-4] + ".idx"
        idx_files.append(idx if os.path.isfile(idx) else None)
    if bad:
        warnings.warn(f"{len(bad)} sample(s) in {d} skipped: {summarize_bad(bad)}", stacklevel=2)
    if not files:
        raise DatasetError(f"no usable samples in the shards of {d!r}")
    num_classes = int(manifest.get("num_classes", max(labels) + 1))
    classes = list(manifest.get("classes", [str(c) for c in range(num_classes)]))
    if max(labels) >= len(classes) or min(labels) < 0:
        raise DatasetError(f"labels in {d!r} range over [{min(labels)}, {max(labels)}] but there are {len(classes)} classes")
    return WebDatasetSplit(root, split, classes, files, labels, bad_files=bad, shards=shards, shard_sizes=sizes,
                           index_files=idx_files, members=members)


def decode_member(handle: str) -> torch.Tensor:
    """uint8 [3, H, W] of a ``"<tar>::<offset>:<size>"`` member (PIL, as the ImageFolder path)."""
    from PIL import Image

    path, _, loc = handle.rpartition("::")
    offset, size = (int(v) for v in loc.split(":"))
    with Image.open(io.BytesIO(_read_member(path, offset, size))) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _write_index(path: str, entries: Sequence[Tuple[int, int, str, str, int, int]]) -> None:
    """A DALI webdataset index (``wds2idx`` v1.2) for ``entries`` = (img offset, size, ext, key,
    cls offset, cls size): one line per sample, components ``ext offset size name``."""
    with open(path, "w") as f:
        f.write(f"v1.2 {len(entries)}\n")
        for off, size, ext, key, c_off, c_size in entries:
            f.write(f"{ext} {off} {size} {key}.{ext} cls {c_off} {c_size} {key}.cls\n")


def write_shards(root: str, split: str, out: str, *, samples_per_shard: int = 1000,
                 shuffle_seed: Optional[int] = None) -> List[str]:
    """Write ``root/split`` (an ImageFolder split) as webdataset shards ``out/split/split-NNNNNN.tar``
    (+ DALI ``.idx`` + ``shards.json``); returns the tar paths.  Samples keep the ImageFolder order
    unless ``shuffle_seed`` is given.  Image bytes are copied unchanged."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    data = scan_image_folder(root, split, validate="header")
    order = np.arange(len(data))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(data))
    d = os.path.join(out, split)
    os.makedirs(d, exist_ok=True)
    paths, sizes = [], []
    for s, start in enumerate(range(0, len(order), samples_per_shard)):
        path = os.path.join(d, f"{split}-{s:06d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in order[start:start + samples_per_shard]:
                src = data.files[int(i)]
                ext = os.path.splitext(src)[1].lstrip(".").lower() or "jpg"
                key = f"{int(i):08d}"
                for name, payload in ((f"{key}.{ext}", open(src, "rb").read()),
                                      (f"{key}.cls", str(data.labels[int(i)]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(payload), 0o644, 0
                    tf.addfile(info, io.BytesIO(payload))
        os.replace(tmp, path)
        entries = []
        for key, comps in _scan_tar(path):
            ext = next(e for e in IMAGE_EXTS if e in comps)
            entries.append((*comps[ext], ext, os.path.basename(key), *comps["cls"]))
        _write_index(path[:-4] + ".idx", entries)
        paths.append(path)
        sizes.append(len(entries))
    with open(os.path.join(d, MANIFEST), "w") as f:
        json.dump({"classes": data.classes, "num_classes": data.num_classes, "samples": sizes,
                   "shards": [os.path.basename(p) for p in paths]}, f, indent=1)
    return paths


# --------------------------------------------------------------------------------- the loaders

class _StartMixin:
    plan: ShardPlan

    def set_start_batch(self, batch: int) -> None:
        """Skip the first ``batch`` batches of the next epoch (resume), without reading them."""
        if batch < 0 or batch > len(self.plan):
            raise ValueError(f"start batch must be in [0, {len(self.plan)}], got {batch}")
        self.plan.start_batch = int(batch)

    def _epoch_done(self) -> None:
        self.plan.start_batch = 0


class TorchShardLoader(_StartMixin, LoaderBase):
    """The torchvision pipeline over tar members (random access by offset; workers read in order)."""

    backend = "torch"

    def __init__(self, split: WebDatasetSplit, pipeline: str, specs, plan: ShardPlan, *, num_workers: int,
                 seed: int, device: torch.device):
        from .torch_loader import TorchLoader

        self.split, self.plan, self.pipeline, self.device = split, plan, pipeline, device
        self._inner = TorchLoader(split, pipeline, specs, plan, num_workers=num_workers, seed=seed, device=device,
                                  decode=decode_member)

    def set_epoch(self, epoch: int) -> None:
        self._inner.set_epoch(epoch)

    def __iter__(self):
        try:
            yield from self._inner
        finally:
            self._epoch_done()


class DaliShardLoader(_StartMixin, LoaderBase):
    """DALI's ``fn.readers.webdataset`` over this rank's tars of the epoch; the index given to DALI
    lists exactly the samples the plan picked (whole tars, minus truncation or resumed batches)."""

    backend = "dali"

    def __init__(self, split: WebDatasetSplit, pipeline: str, specs, plan: ShardPlan, *, num_workers: int,
                 seed: int, device: torch.device):
        self.split, self.pipeline, self.specs, self.plan, self.seed, self.device = (
            split, pipeline, specs, plan, seed, device)
        self.num_threads = max(1, int(num_workers))
        self.epoch = 0
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self._tmp = tempfile.TemporaryDirectory(prefix="fastmask-wds-idx-")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _sources(self, idx: np.ndarray) -> Tuple[List[str], List[str]]:
        """(tar paths, index paths) that make DALI read exactly the samples ``idx``, in order."""
        starts = self.split.shard_starts
        shard_of = np.searchsorted(np.asarray(starts), idx, side="right") - 1
        paths, index_paths = [], []
        run_start = 0
        for pos in range(1, len(idx) + 1):
            if pos < len(idx) and shard_of[pos] == shard_of[run_start]:
                continue
            s = int(shard_of[run_start])
            run = idx[run_start:pos]
            full = len(run) == self.split.shard_sizes[s] and self.split.index_files[s] is not None
            if full:
                index_paths.append(self.split.index_files[s])
            else:
                cls_loc = {key: comps["cls"] for key, comps in _scan_tar(self.split.shards[s])}
                entries = []
                for i in run.tolist():
                    off, size, ext, key = self.split.members[i]
                    entries.append((off, size, ext, os.path.basename(key), *cls_loc[key]))
                path = os.path.join(self._tmp.name, f"e{self.epoch}-{len(paths)}-{s}.idx")
                _write_index(path, entries)
                index_paths.append(path)
            paths.append(self.split.shards[s])
            run_start = pos
        return paths, index_paths

    def __iter__(self):
        from nvidia.dali import fn
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from .dali_loader import build_pipeline

        idx = self.plan.indices(self.epoch)
        try:
            if len(idx) == 0:
                return
            paths, index_paths = self._sources(idx)

            def reader():
                image, cls = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=[";".join(IMAGE_EXTS), "cls"],
                                                   missing_component_behavior="error", random_shuffle=False,
                                                   pad_last_batch=True, name=_READER)
                return image, fn.pad(cls, fill_value=32, shape=[_LABEL_BYTES], axes=[0])

            seed = derive_seed(self.seed, self.epoch, self.plan.shard_id, self.plan.start_batch, 0xDA12)
            pipe, n_views = build_pipeline([], [], self.pipeline, self.specs, batch_size=self.plan.batch_size,
                                           num_threads=self.num_threads, device_id=self.device_id, seed=seed,
                                           reader=reader)
            names = [f"view{k}" for k in range(n_views)] + ["label"]
            policy = LastBatchPolicy.DROP if self.plan.drop_last else LastBatchPolicy.PARTIAL
            it = DALIGenericIterator([pipe], names, reader_name=_READER, last_batch_policy=policy, auto_reset=False)
            nb = self.device.type == "cuda"
            for out in it:
                out = out[0]
                digits = out["label"].cpu().to(torch.int64)
                is_digit = (digits >= 48) & (digits <= 57)
                place = 10 ** (is_digit.sum(1, keepdim=True) - 1 - (is_digit.cumsum(1) - 1)).clamp_min(0)
                labels = ((digits - 48) * place * is_digit).sum(1).to(self.device, non_blocking=nb)
                views = [out[n].to(self.device, non_blocking=nb) for n in names[:-1]]
                yield (views if self.pipeline == "multicrop" else views[0]), labels
        finally:
            self._epoch_done()


def main(argv=None) -> int:
    """``python -m fastmask.data.webdataset ROOT OUT``: ImageFolder splits -> webdataset shards."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastmask.data.webdataset", description=main.__doc__)
    p.add_argument("root", help="ImageFolder root (train/, val/) or builtin:shapes / builtin:digits")
    p.add_argument("out", help="output root (OUT/train/*.tar, OUT/val/*.tar)")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the train split before sharding")
    args = p.parse_args(argv)
    from . import DataConfig, resolve_data_root

    root = resolve_data_root(DataConfig(data=args.root))
    for split in args.splits.split(","):
        seed = args.shuffle_seed if split == "train" else None
        paths = write_shards(root, split, args.out, samples_per_shard=args.samples_per_shard, shuffle_seed=seed)
        print(f"{split}: {len(paths)} shard(s) in {os.path.join(args.out, split)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
