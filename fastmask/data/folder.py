"""ImageFolder scanning with up-front validation, and the per-epoch shard plan.

A DALI pipeline cannot skip an undecodable image: one corrupt file ends the epoch with an
error.  So files are checked before any pipeline is built, cheaply by default (magic bytes,
the JPEG end-of-image / PNG IEND marker that truncated files lack, and a PIL header parse), or
with a full PIL decode (``validate="full"``).  Results are cached per file (keyed by size and
mtime) so a large tree is checked once.  Bad files are skipped, counted and reported in one
warning; a tree that leaves nothing to train on fails at once with a message that says why.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
VALIDATE_MODES = ("header", "full", "none")
_CACHE_VERSION = 1


class DatasetError(ValueError):
    """The dataset cannot be used at all (no classes, no usable images)."""


def _sniff_format(head: bytes) -> Optional[str]:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:1] == b"P" and head[1:2] in b"123456":
        return "pnm"
    return None


def check_image_file(path: str, mode: str = "header") -> Optional[str]:
    """Why ``path`` cannot be used as an image, or None when it looks fine."""
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file (extension)"
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    kind = _sniff_format(head)
    if kind is None:
        return "not an image (unknown file signature)"
    if mode == "none":
        return None
    # Truncation is the common corruption (interrupted copy/download): the end marker is gone.
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width <= 0 or im.height <= 0:
                return "image has zero size"
            if mode == "full":
                im.convert("RGB").load()
    except Exception as e:  # PIL raises many types for bad data; any of them means "skip"
        return f"cannot decode ({type(e).__name__}: {e})"
    if mode == "full" and kind == "jpeg":
        # A JPEG cut short and then given an end marker (a common way broken copies end) decodes
        # in PIL without error: libjpeg only *warns* and pads the missing rows with grey.
        complaint = _libjpeg_warning(path)
        if complaint:
            return f"corrupt JPEG ({complaint})"
    return None


def _libjpeg_warning(path: str) -> Optional[str]:
    """libjpeg's warning for ``path`` ("Corrupt JPEG data: ..."), or None for a clean decode.

    libjpeg writes its warnings straight to file descriptor 2 (neither PIL nor torchvision turn them
    into exceptions), so the decode runs with fd 2 pointed at a temporary file.
    """
    import tempfile

    try:
        from torchvision.io import decode_jpeg, read_file
    except Exception:  # torchvision without image I/O: PIL's check above is all we have
        return None
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision's deprecation notice for its decoders
                decode_jpeg(read_file(path))
            error = None
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace").strip()
    lines = [line.strip() for line in text.splitlines() if "JPEG" in line or "jpeg" in line]
    return error or (lines[0] if lines else None)


class _ValidationCache:
    """{relative path: [size, mtime_ns, reason or None]} in a JSON file, written atomically."""

    def __init__(self, cache_dir: Optional[str], root: str, mode: str):
        self.path = None
        self.entries: Dict[str, list] = {}
        self.dirty = False
        if cache_dir:
            key = hashlib.sha1(f"{os.path.realpath(root)}|{mode}|{_CACHE_VERSION}".encode()).hexdigest()[:16]
            self.path = os.path.join(os.path.expanduser(cache_dir), "validation", f"{key}.json")
            try:
                with open(self.path) as f:
                    self.entries = json.load(f)
            except (OSError, ValueError):
                self.entries = {}

    def lookup(self, rel: str, st: os.stat_result):
        hit = self.entries.get(rel)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return True, hit[2]
        return False, None

    def store(self, rel: str, st: os.stat_result, reason: Optional[str]):
        self.entries[rel] = [st.st_size, st.st_mtime_ns, reason]
        self.dirty = True

    def save(self):
        if not (self.path and self.dirty):
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # the cache only saves time; failing to write it is not an error


@dataclass
class ImageFolderSplit:
    """The usable files of one split, in a stable (sorted) order."""

    root: str
    split: str
    classes: List[str]
    files: List[str]
    labels: List[int]
    bad_files: List[Tuple[str, str]] = field(default_factory=list)
    empty_classes: List[str] = field(default_factory=list)
    late_bad: set = field(default_factory=set)
    ignored: int = 0  # hidden and non-image files (``.DS_Store``, ``notes.txt``): not data, not bad

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def mark_bad(self, bad: Dict[str, str]) -> None:
        """Record files found bad after the scan (e.g. by the DALI decoder).  ``files`` keeps its
        order and length, since shard plans index into it; loaders skip ``late_bad`` files."""
        for path, reason in sorted(bad.items()):
            if path not in self.late_bad:
                self.late_bad.add(path)
                self.bad_files.append((path, reason))


# (split directory, validation mode, bad files) already reported by a warning in this process.
_REPORTED: set = set()


def _ignored(fname: str) -> bool:
    """Files that are not meant as data: hidden ones and those without an image extension."""
    return fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(path: str) -> List[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(
    root: str, split: str, *, validate: str = "header", cache_dir: Optional[str] = None
) -> ImageFolderSplit:
    """Scan ``root/split/<class>/*`` with classes taken from ``root/train`` (so that train and val
    agree on label ids even when a val class folder is missing or empty)."""
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset directory {root!r} does not exist")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"split directory {split_dir!r} does not exist; expected an ImageFolder tree "
            f"{root}/{{train,val}}/<class>/<image>"
        )
    class_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else split_dir
    classes = _class_dirs(class_root)
    if not classes:
        raise DatasetError(f"no class folders in {class_root!r}; expected {class_root}/<class>/<image>")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    cache = _ValidationCache(cache_dir, root, validate)
    files: List[str] = []
    labels: List[int] = []
    bad: List[Tuple[str, str]] = []
    ignored = 0
    counts = {c: 0 for c in classes}
    for name in _class_dirs(split_dir):
        class_dir = os.path.join(split_dir, name)
        label = class_to_idx.get(name)
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                path = os.path.join(dirpath, fname)
                if _ignored(fname):
                    ignored += 1
                    continue
                if label is None:
                    bad.append((path, f"class folder {name!r} is not a class of {class_root!r}"))
                    continue
                rel = os.path.relpath(path, root)
                try:
                    st = os.stat(path)
                except OSError as e:
                    bad.append((path, f"unreadable ({e.strerror or e})"))
                    continue
                hit, reason = cache.lookup(rel, st)
                if not hit:
                    reason = check_image_file(path, validate)
                    cache.store(rel, st, reason)
                if reason is None:
                    files.append(path)
                    labels.append(label)
                    counts[name] += 1
                else:
                    bad.append((path, reason))
    cache.save()

    empty = [c for c in classes if counts[c] == 0]
    report_key = (os.path.realpath(split_dir), validate, tuple(bad))
    first_report = report_key not in _REPORTED  # evaluation rescans the split: say it once
    _REPORTED.add(report_key)
    if bad and first_report:
        shown = "; ".join(f"{os.path.relpath(p, root)}: {r}" for p, r in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        warnings.warn(f"skipping {len(bad)} bad file(s) in {split_dir}: {shown}{more}", stacklevel=3)
    if not files:
        raise DatasetError(
            f"no usable images in {split_dir!r} ({len(bad)} bad file(s) skipped, "
            f"{len(classes)} class folder(s) from {class_root!r})"
        )
    if empty and first_report:
        warnings.warn(
            f"{len(empty)} class folder(s) in {split_dir} have no usable images: {', '.join(empty[:10])}",
            stacklevel=3,
        )
    return ImageFolderSplit(root, split, classes, files, labels, bad, empty, ignored=ignored)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across runs and platforms."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class ShardPlan:
    """Which samples (indices into the split) a shard, i.e. a rank, reads in a given epoch.

    Samples are dealt one by one (an ImageFolder) or, with ``tar_sizes`` (the samples of each
    webdataset tar file, see ``webdataset.py``), in whole tar files.  Every shard draws the same
    permutation of these units from (seed, epoch) and takes a strided slice of it, so shards never
    overlap.  With ``drop_last`` the permutation is cut to a multiple of ``num_shards`` (every shard
    gets the same number of batches, as DDP needs) and partial batches are dropped; without it,
    shards cover every sample.  ``start_batch`` skips the first batches of the next epoch (resume
    of sharded loaders; they reset it after one epoch).
    """

    num_samples: int
    batch_size: int
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    tar_sizes: Optional[List[int]] = None
    start_batch: int = 0

    @classmethod
    def of_tars(cls, tar_sizes: Sequence[int], batch_size: int, shard_id: int = 0, num_shards: int = 1,
                seed: int = 0, shuffle: bool = True, drop_last: bool = True) -> "ShardPlan":
        """The plan that deals whole tar files holding ``tar_sizes`` samples each."""
        sizes = [int(s) for s in tar_sizes]
        return cls(sum(sizes), batch_size, shard_id, num_shards, seed, shuffle, drop_last, tar_sizes=sizes)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_shards < 1 or not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards), got shard_id={self.shard_id}, "
                             f"num_shards={self.num_shards}")
        tars = self.tar_sizes
        if tars is not None and len(tars) < self.num_shards:
            raise DatasetError(f"{len(tars)} tar shard(s) cannot be split over {self.num_shards} ranks "
                               f"(each rank reads whole tars): write at least {self.num_shards} shards")
        if self.drop_last and self.samples_per_shard < self.batch_size:
            if tars is not None:
                raise DatasetError(f"{self.samples_per_shard} samples per rank (whole tars) are fewer than "
                                   f"batch_size={self.batch_size}")
            raise DatasetError(
                f"{self.num_samples} usable images split over {self.num_shards} shard(s) give "
                f"{self.samples_per_shard} per shard, fewer than batch_size={self.batch_size} "
                f"(with drop_last every batch must be full)"
            )

    @property
    def samples_per_shard(self) -> int:
        tars = self.tar_sizes
        if tars is None:
            if self.drop_last:
                return self.num_samples // self.num_shards
            return len(range(self.shard_id, self.num_samples, self.num_shards))
        if self.drop_last:  # what the shard with the smallest tars is sure to have, any epoch
            return int(sum(sorted(tars)[: len(tars) // self.num_shards]))
        return int(sum(tars[self.shard_id :: self.num_shards]))

    def __len__(self) -> int:
        n = self.samples_per_shard
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def units_for(self, epoch: int) -> np.ndarray:
        """The samples, or with ``tar_sizes`` the tar files, this shard reads in ``epoch``, in order."""
        n = self.num_samples if self.tar_sizes is None else len(self.tar_sizes)
        if self.shuffle:
            salt = 0x5EED if self.tar_sizes is None else 0x7A25  # kept apart: the orders runs were trained with
            order = np.random.default_rng(derive_seed(self.seed, epoch, salt)).permutation(n)
        else:
            order = np.arange(n)
        if self.drop_last:
            order = order[: (n // self.num_shards) * self.num_shards]
        return order[self.shard_id :: self.num_shards]

    def shards_for(self, epoch: int) -> List[int]:
        """The tar files (indices into ``tar_sizes``) this shard reads in ``epoch``, in reading order."""
        if self.tar_sizes is None:
            raise ValueError("shards_for: this plan deals single samples (no tar_sizes)")
        return [int(s) for s in self.units_for(epoch)]

    def indices(self, epoch: int) -> np.ndarray:
        """Sample indices of this shard's epoch (after ``start_batch`` skipped batches)."""
        mine = self.units_for(epoch)
        if self.tar_sizes is not None:
            starts = np.concatenate([[0], np.cumsum(self.tar_sizes)[:-1]]).astype(np.int64)
            parts = [np.arange(starts[s], starts[s] + self.tar_sizes[s]) for s in mine.tolist()]
            mine = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if self.drop_last:
            mine = mine[: len(self) * self.batch_size]
        return mine[self.start_batch * self.batch_size:]


def summarize_bad(bad: Sequence[Tuple[str, str]]) -> str:
    return ", ".join(f"{os.path.basename(p)} ({r})" for p, r in bad[:5])


class LoaderBase:
    """What both loaders report about their split and shard (``split`` and ``plan`` set by subclasses)."""

    split: "ImageFolderSplit"
    plan: "ShardPlan"

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    @property
    def num_samples(self) -> int:
        return len(self.split)

    @property
    def bad_files(self) -> int:
        return len(self.split.bad_files)

    def __len__(self) -> int:
        return len(self.plan)

