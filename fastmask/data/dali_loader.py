"""The DALI pipelines: file reader -> decode once -> per-crop augmentation -> torch tensors.

On a GPU the decoder runs with ``device="mixed"`` (nvJPEG; the augmentations then run on the GPU
and batches arrive as CUDA tensors).  Without one the same graph runs on the CPU
(``device_id=None``).  Probabilistic ops use no branching: each random decision is a per-sample
``coin_flip`` folded into the op's per-sample parameters, chosen so that "off" is an exact identity:

* colour jitter off  -> brightness = contrast = saturation = 1, hue = 0; grayscale -> saturation 0
* blur off           -> sigma = 1e-6 (a 1-pixel window)
* solarisation off   -> threshold 128 + 1000 (no pixel reaches it)

The file order of each epoch comes from the shared ``ShardPlan`` (the reader itself does not
shuffle), so DALI and torch read the same samples in the same order for a given (seed, epoch).
Because a DALI decoder cannot skip a bad image, files are validated before the pipeline is built;
if one still fails mid-epoch, the rest of the epoch's files are fully decoded with PIL, the bad
ones are dropped and counted, and a new pipeline continues where the old one stopped.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch

from . import augment
from .folder import LoaderBase, ImageFolderSplit, ShardPlan, check_image_file, derive_seed, summarize_bad

_READER = "Reader"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


class _Graph:
    """Helpers that build DALI graph pieces; ``gpu`` says whether images live on the GPU."""

    def __init__(self, gpu: bool):
        from nvidia.dali import fn, types

        self.fn, self.types, self.gpu = fn, types, gpu

    def uniform(self, lo: float, hi: float):
        return self.fn.random.uniform(range=[float(lo), float(hi)])

    def coin(self, p: float):
        return self.fn.cast(self.fn.random.coin_flip(probability=float(p)), dtype=self.types.FLOAT)

    def gated(self, p: float, value, off: float, gate=None):
        """``value`` with probability p (or where ``gate`` is 1), else the constant ``off``."""
        if gate is None:
            if p >= 1.0:
                return value
            gate = self.coin(p)
        return off + gate * (value - off)

    def random_resized_crop(self, images, size: int, scale):
        return self.fn.random_resized_crop(
            images,
            size=[size, size],
            random_area=[float(scale[0]), float(scale[1])],
            random_aspect_ratio=list(augment.ASPECT_RATIO),
            num_attempts=10,
            interp_type=self.types.INTERP_CUBIC,
            antialias=True,
        )

    def color_twist(self, images, brightness, contrast, saturation, hue):
        return self.fn.color_twist(images, brightness=brightness, contrast=contrast,
                                   saturation=saturation, hue=hue)

    def jitter(self, images, jitter: Optional[augment.ColorJitterSpec]):
        if jitter is None:
            return images
        # One coin for the whole jitter: it is applied (all four factors) or not at all.
        on = self.coin(jitter.prob) if jitter.prob < 1.0 else None
        b = self.gated(jitter.prob, self.uniform(1 - jitter.brightness, 1 + jitter.brightness), 1.0, on)
        c = self.gated(jitter.prob, self.uniform(1 - jitter.contrast, 1 + jitter.contrast), 1.0, on)
        s = self.gated(jitter.prob, self.uniform(1 - jitter.saturation, 1 + jitter.saturation), 1.0, on)
        h = self.gated(jitter.prob, self.uniform(-jitter.hue * 360.0, jitter.hue * 360.0), 0.0, on)
        if jitter.grayscale_prob > 0:
            s = s * (1.0 - self.coin(jitter.grayscale_prob))
        return self.color_twist(images, b, c, s, h)

    def blur(self, images, p: float, gate=None):
        if p <= 0.0:
            return images
        sigma = self.gated(p, self.uniform(*augment.BLUR_SIGMA), augment.NO_BLUR_SIGMA, gate)
        return self.fn.gaussian_blur(images, sigma=sigma)

    def solarize(self, images, p: float, gate=None):
        if p <= 0.0:
            return images
        fn, types = self.fn, self.types
        on = gate if gate is not None else self.coin(p)
        threshold = augment.SOLARIZE_THRESHOLD + (1.0 - on) * 1000.0
        if self.gpu:
            threshold = threshold.gpu()
        x = fn.cast(images, dtype=types.FLOAT)
        out = (x >= threshold) * (255.0 - x) + (x < threshold) * x
        return fn.cast(out, dtype=types.UINT8)

    def normalize(self, images, flip_prob: float, crop=None):
        kwargs = {}
        if crop is not None:
            kwargs = dict(crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5)
        mirror = self.fn.random.coin_flip(probability=flip_prob) if flip_prob > 0 else 0
        return self.fn.crop_mirror_normalize(
            images,
            dtype=self.types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in augment.IMAGENET_MEAN],
            std=[255.0 * s for s in augment.IMAGENET_STD],
            mirror=mirror,
            **kwargs,
        )

    # --- whole views -----------------------------------------------------------------------
    def crop_view(self, images, spec: augment.CropSpec):
        x = self.random_resized_crop(images, spec.size, spec.scale)
        x = self.jitter(x, spec.jitter)
        x = self.blur(x, spec.blur_prob)
        x = self.solarize(x, spec.solarize_prob)
        return self.normalize(x, spec.flip_prob)

    def supervised_view(self, images, spec: augment.SupervisedSpec):
        fn, types = self.fn, self.types
        x = self.random_resized_crop(images, spec.size, spec.scale)
        if spec.three_augment is not None:
            choice = fn.random.choice(3)
            is_gray = fn.cast(choice == 0, dtype=types.FLOAT)
            is_solarize = fn.cast(choice == 1, dtype=types.FLOAT)
            is_blur = fn.cast(choice == 2, dtype=types.FLOAT)
            x = self.solarize(x, 1.0, gate=is_solarize)
            x = self.blur(x, 1.0, gate=is_blur)
            j = spec.three_augment.jitter
            x = self.color_twist(
                x, self.uniform(1 - j, 1 + j), self.uniform(1 - j, 1 + j),
                self.uniform(1 - j, 1 + j) * (1.0 - is_gray), 0.0,
            )
        return self.normalize(x, spec.flip_prob)

    def eval_view(self, images, spec: augment.EvalSpec):
        # subpixel_scale=False: scale each axis by out/in of the rounded output size, as
        # torchvision does, so the two backends sample the same source positions.
        x = self.fn.resize(images, resize_shorter=spec.resize_shorter, subpixel_scale=False,
                           interp_type=self.types.INTERP_CUBIC, antialias=True)
        return self.normalize(x, 0.0, crop=spec.size)


def build_pipeline(files: List[str], labels: List[int], pipeline: str, specs, *, batch_size: int,
                   num_threads: int, device_id: Optional[int], seed: int, reader=None):
    """A built DALI pipeline whose outputs are the views then the labels.  ``reader()`` builds the
    (encoded images, labels) nodes instead of the file reader (webdataset shards)."""
    from nvidia.dali import Pipeline, fn, types

    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=2)
    graph = _Graph(gpu)
    with pipe:
        if reader is not None:
            encoded, label = reader()
        else:
            encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                             pad_last_batch=True, name=_READER)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if pipeline == "multicrop":
            views = [graph.crop_view(images, spec) for spec in specs]
        elif pipeline == "supervised":
            views = [graph.supervised_view(images, specs)]
        else:
            views = [graph.eval_view(images, specs)]
        pipe.set_outputs(*views, label)
    pipe.build()
    return pipe, len(views)


class DaliLoader(LoaderBase):
    backend = "dali"

    def __init__(self, split: ImageFolderSplit, pipeline: str, specs, plan: ShardPlan, *,
                 num_workers: int, seed: int, device: torch.device):
        self.split = split
        self.pipeline = pipeline
        self.specs = specs
        self.plan = plan
        self.seed = seed
        self.device = device
        self.num_threads = max(1, int(num_workers))
        self.epoch = 0
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _iterator(self, files, labels, attempt: int):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        seed = derive_seed(self.seed, self.epoch, self.plan.shard_id, attempt, 0xDA11)
        pipe, n_views = build_pipeline(files, labels, self.pipeline, self.specs, batch_size=self.plan.batch_size,
                                       num_threads=self.num_threads, device_id=self.device_id, seed=seed)
        names = [f"view{k}" for k in range(n_views)] + ["label"]
        policy = LastBatchPolicy.DROP if self.plan.drop_last else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], names, reader_name=_READER, last_batch_policy=policy,
                                   auto_reset=False), pipe, names

    def _drop_bad(self, files: List[str]) -> List[str]:
        """``files`` without known-bad ones.  For training (drop_last) the list is topped up by
        repeating its first good files, so this shard still yields as many batches as the others
        (DDP ranks must agree on the number of steps)."""
        late_bad = self.split.late_bad
        good = [f for f in files if f not in late_bad]
        if self.plan.drop_last and good and len(good) < len(files):
            good += [good[k % len(good)] for k in range(len(files) - len(good))]
        return good

    def _find_undecodable(self, files: List[str]) -> int:
        """Fully decode ``files`` with PIL; record the ones that fail.  Returns how many."""
        bad = {}
        for f in dict.fromkeys(files):
            if f in self.split.late_bad:
                continue
            reason = check_image_file(f, "full")
            if reason is not None:
                bad[f] = reason
        if bad:
            self.split.mark_bad(bad)
            warnings.warn(f"DALI could not decode {len(bad)} file(s) that passed the header check; "
                          f"skipped: {summarize_bad(list(bad.items()))}", stacklevel=3)
        return len(bad)

    def __iter__(self):
        idx = self.plan.indices(self.epoch).tolist()
        files = [self.split.files[i] for i in idx]
        label_of = {f: self.split.labels[i] for f, i in zip(files, idx)}
        files = self._drop_bad(files)
        attempt = 0
        while files:
            it = pipe = None
            consumed = 0
            try:
                # The iterator decodes its first batch on construction: keep it inside the try.
                it, pipe, names = self._iterator(files, [label_of[f] for f in files], attempt)
                while True:
                    try:
                        out = next(it)[0]
                    except StopIteration:
                        return
                    consumed += out["label"].shape[0]
                    yield self._to_output(out, names)
            except RuntimeError as err:
                # A file the cheap check let through failed to decode; everything already yielded
                # stays yielded, the rest of the epoch is checked in full and read by a new pipeline.
                if "decoders.image" not in str(err):
                    raise  # not a data problem (e.g. a graph or device error): nothing to skip
                remaining = files[consumed:]
                if self._find_undecodable(remaining) == 0:
                    raise
                files = self._drop_bad(remaining)
                attempt += 1
            finally:
                del it, pipe

    def _to_output(self, out, names):
        non_blocking = self.device.type == "cuda"
        labels = out["label"].reshape(-1).to(torch.int64).to(self.device, non_blocking=non_blocking)
        views = [out[n].to(self.device, non_blocking=non_blocking) for n in names[:-1]]
        if self.pipeline == "multicrop":
            return views, labels
        return views[0], labels
