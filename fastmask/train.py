"""``python -m fastmask.train``: the training driver shared by every method.

    python -m fastmask.train                                  # DINO + student-global masking on builtin:shapes
    python -m fastmask.train --method ibot --config ibot_tiny_builtin
    python -m fastmask.train --config ibot_vits16_attmask_high --data /data/imagenet optim.lr=1e-3
    torchrun --nproc_per_node 8 -m fastmask.train --config ... # DDP (nccl on GPU, gloo on CPU)
    python -m fastmask.train --config ... --resume            # continue output_dir/checkpoint.pt

The driver owns the loop, AdamW with linear warm-up + cosine decay (lr scaled by global batch/256),
the weight-decay and teacher-momentum cosine schedules, AMP (bf16 autocast on GPU), gradient
clipping, freezing of the last head layer, ``torch.compile``, DDP, atomic checkpoints and exact
resume, logging (progress bar, JSON lines, TensorBoard) and evaluation (weighted k-NN, attention
maps).  A method (``fastmask.methods``) only turns a batch into a loss.

Exact resume: every source of randomness inside a step (drop-path, mask policies) is reseeded from
``(seed, step, rank)`` at the start of the step, and the loader's order/augmentation is a function
of ``(seed, epoch)``; a checkpoint stores the global step, so a killed run resumed from its last
checkpoint reproduces the uninterrupted run's parameters.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ConfigError, TrainConfig, config_to_dict, load_config
from .engine.optim import clip_gradients, lamb
from .methods import get_method, method_names
from .methods.base import Method, StepState

__all__ = ["main", "train", "knn_accuracy", "cosine_schedule", "step_seed", "Trainer"]

CHECKPOINT_NAME = "checkpoint.pt"


# ------------------------------------------------------------------------------------ schedules

def cosine_schedule(step: int, total_steps: int, base: float, final: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / max(1, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def step_seed(seed: int, step: int, rank: int = 0, stream: str = "") -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank): the basis of exact resume."""
    h = hashlib.blake2b(f"{seed}:{step}:{rank}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------ distributed

def _init_distributed(device_pref: str):
    """(rank, world_size, local_rank, initialised_here) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    use_cuda = torch.cuda.is_available() and device_pref.lower() != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    return rank, world, local_rank, True


def _all_reduce_grads(params: List[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks, flattened into few buckets.

    Done by hand rather than with DistributedDataParallel because methods may run several forwards
    and backwards per step (MaskSub) or none through the wrapped module (EMA teacher); averaging
    after all backwards is correct for every method.
    """
    if world <= 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket, size, cap = [], 0, 25 * 2 ** 20
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= cap):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def _broadcast_module(module: torch.nn.Module) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.state_dict().values()):
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, src=0)


# ------------------------------------------------------------------------------------ misc helpers

def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _batch_size(batch) -> int:
    """Number of images in a batch (not crops)."""
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    while isinstance(first, (list, tuple)):
        first = first[0]
    return int(first.shape[0])


def _resolve_device(pref: str, local_rank: int) -> torch.device:
    pref = pref.lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={pref} was asked for but no CUDA device is visible")
    if pref == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(pref)


def _amp_dtype(pref: str, device: torch.device) -> Optional[torch.dtype]:
    pref = pref.lower()
    if pref == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if pref in ("bf16", "on"):
        return torch.bfloat16
    if pref == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp=fp16 needs a CUDA device (use bf16 or off on the CPU)")
        return torch.float16
    return None


def _make_optimizer(groups, lr: float, betas, device: torch.device, name: str = "adamw"):
    if name == "lamb":
        return lamb(groups, lr, betas)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore

            return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
        except ImportError:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _compile_in_place(method: torch.nn.Module) -> int:
    """torch.compile the transformer blocks and head MLPs, in place (``nn.Module.compile``).

    Methods call ``forward_features``/``forward_cls`` rather than ``forward`` of their models, so the
    modules compiled are the ones always entered through ``__call__``: every ViT block and every
    projection MLP.  In place keeps state-dict keys, checkpoints and EMA pairing unchanged.
    """
    count = 0
    for module in method.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, torch.nn.Sequential) and hasattr(module, "forward_features"):
            for blk in blocks:
                blk.compile()
                count += 1
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, torch.nn.Sequential) and hasattr(module, "last_layer"):
            mlp.compile()
            count += 1
    if count == 0:
        warnings.warn("compile=true: found no ViT blocks or head MLPs to compile")
    return count


# ------------------------------------------------------------------------------------ data glue

def _make_loader(cfg: TrainConfig, split: str, pipeline: str, *, shard_id: int, num_shards: int,
                 device: torch.device):
    from .data import make_loader

    return make_loader(cfg.data, split, pipeline, shard_id=shard_id, num_shards=num_shards,
                       seed=cfg.seed, device=device)


def _set_loader_epoch(loader, epoch: int) -> None:
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn):
            fn(epoch)
            return


def _num_classes(loader) -> int:
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


def _split_batch(batch):
    """(inputs, labels) from a loader batch."""
    if isinstance(batch, dict):
        return batch.get("images", batch.get("crops")), batch.get("labels")
    return batch[0], batch[1]


# ------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def extract_features(backbone, loader, device, amp_dtype=None, limit: int = 0):
    """L2-normalised CLS features and labels of a whole (eval) loader."""
    feats, labels, n = [], [], 0
    for batch in loader:
        images, target = _split_batch(batch)
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = backbone.forward_features(images)
        cls = getattr(out, "cls", out)
        feats.append(F.normalize(cls.float(), dim=-1))
        labels.append(torch.as_tensor(target).to(device))
        n += images.shape[0]
        if limit and n >= limit:
            break
    feats, labels = torch.cat(feats), torch.cat(labels).long()
    if limit:
        feats, labels = feats[:limit], labels[:limit]
    return feats, labels


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, val_feats, val_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 256) -> Dict[str, float]:
    """Weighted k-NN (DINO protocol): votes exp(cos/T) of the k nearest train features.

    Features must be L2-normalised.  Returns top-1 (and top-5 when there are >= 5 classes) in %.
    """
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError("k-NN needs non-empty train and val features")
    k = min(k, train_feats.shape[0])
    top1 = top5 = 0
    for start in range(0, val_feats.shape[0], chunk):
        q = val_feats[start:start + chunk]
        y = val_labels[start:start + chunk]
        sim = q @ train_feats.T
        w, idx = sim.topk(k, dim=1)
        neighbours = train_labels[idx]  # [b, k]
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, neighbours, (w / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        top1 += (ranked[:, 0] == y).sum().item()
        if num_classes >= 5:
            top5 += (ranked[:, :5] == y[:, None]).any(dim=1).sum().item()
    n = val_feats.shape[0]
    out = {"knn_top1": 100.0 * top1 / n}
    if num_classes >= 5:
        out["knn_top5"] = 100.0 * top5 / n
    return out


def _pick_images(loader, n: int) -> torch.Tensor:
    """Up to ``n`` validation images of different classes where possible (the eval loader is in
    folder order, so its first batch would often be one class)."""
    chosen, seen, spare = [], set(), []
    for batch in loader:
        images, labels = _split_batch(batch)
        for img, y in zip(images, torch.as_tensor(labels).tolist()):
            if y not in seen:
                seen.add(y)
                chosen.append(img)
            elif len(spare) < n:
                spare.append(img)
            if len(chosen) >= n:
                return torch.stack(chosen)
    chosen += spare[: n - len(chosen)]
    return torch.stack(chosen)


@torch.no_grad()
def save_attention_maps(backbone, images: torch.Tensor, path: str, amp_dtype=None) -> Optional[str]:
    """A PNG grid: each validation image beside it with its last-layer CLS attention overlaid."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: attention-map images are not written")
        return None
    device = images.device
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = backbone.forward_features(images, return_cls_attn=True)
    attn = out.cls_attn.float()
    b, n = attn.shape
    gh = int(round(math.sqrt(n)))
    grid = getattr(backbone, "grid_size", None)
    if grid is not None:
        gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    else:
        gw = n // gh
    maps = attn.reshape(b, 1, gh, gw)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")[:, 0].cpu().numpy()
    imgs = images.float().cpu()
    lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
    hi = imgs.amax(dim=(1, 2, 3), keepdim=True)
    imgs = ((imgs - lo) / (hi - lo).clamp_min(1e-6)).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(2, b, figsize=(2.2 * b, 4.4), squeeze=False)
    for i in range(b):
        axes[0, i].imshow(imgs[i])
        axes[1, i].imshow(imgs[i])
        axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.6)
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    axes[0, 0].set_title("image", fontsize=8, loc="left")
    axes[1, 0].set_title("last-layer CLS attention", fontsize=8, loc="left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ trainer

class Trainer:
    """One training run; ``Trainer(cfg).fit()`` returns the final metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.local_rank, self._owns_pg = _init_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.device = _resolve_device(cfg.device, self.local_rank)
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        self.method_cls = get_method(cfg.method_name)
        self.out_dir = cfg.output_dir
        self.ckpt_path = os.path.join(self.out_dir, CHECKPOINT_NAME)
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # Data first: it fails early on an unusable dataset and tells us the number of classes.
        self.train_loader = _make_loader(cfg, "train", self.method_cls.pipeline, shard_id=self.rank,
                                         num_shards=self.world, device=self.device)
        self.num_classes = _num_classes(self.train_loader)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch < 1:
            raise RuntimeError("the training loader yields no batch (dataset smaller than one batch?)")
        self.total_steps = cfg.epochs * self.steps_per_epoch

        # Same init on every rank (seeded), broadcast anyway so ranks can never drift.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        random.seed(cfg.seed)
        self.method: Method = self.method_cls(cfg, self.num_classes).to(self.device)
        _broadcast_module(self.method)
        self.trainable = [p for g in self.method.param_groups(0.0) for p in g["params"]]

        self.global_batch = self._global_batch_size()
        scale = self.global_batch / 256.0 if cfg.optim.scale_lr_by_batch else 1.0
        self.peak_lr = cfg.optim.lr * scale
        self.min_lr = cfg.optim.min_lr * scale if cfg.optim.scale_min_lr else cfg.optim.min_lr
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.optimizer = _make_optimizer(self.method.param_groups(cfg.optim.weight_decay, cfg.optim.decay_groups), self.peak_lr,
                                         tuple(cfg.optim.betas), self.device, cfg.optim.optimizer.lower())
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        if cfg.compile:
            _compile_in_place(self.method)

        self._old_value_checks = None
        self.step = 0
        self.start_epoch = 0
        self.batch_in_epoch = 0
        self.last_eval: Dict[str, float] = {}
        self.history: List[Dict[str, Any]] = []
        self._resume()

        self.tb = None
        self.metrics_file = None
        if self.is_main:
            self.metrics_file = open(os.path.join(self.out_dir, "metrics.jsonl"), "a")
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"))
                except Exception as e:  # tensorboard missing or broken: keep training
                    warnings.warn(f"TensorBoard logging disabled ({type(e).__name__}: {e})")
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                import yaml

                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)

    # -------------------------------------------------------------------------------- setup
    def _global_batch_size(self) -> int:
        bs = getattr(self.cfg.data, "batch_size", None)
        if bs is None:
            bs = getattr(self.train_loader, "batch_size", None)
        if bs is None:
            raise RuntimeError("cannot tell the batch size (DataConfig.batch_size or loader.batch_size)")
        return int(bs) * self.world

    def _resume(self) -> None:
        cfg = self.cfg
        path = cfg.resume
        if not path:
            return
        if path == "auto":
            if not os.path.isfile(self.ckpt_path):
                if self.is_main:
                    print(f"[fastmask] resume=auto: no checkpoint in {self.out_dir}, starting fresh")
                return
            path = self.ckpt_path
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt.get("config", {})
        for key in ("method",):
            if saved.get(key) not in (None, getattr(cfg, "method_name")):
                raise ConfigError(f"checkpoint {path} is a {saved.get(key)!r} run, not {cfg.method_name!r}")
        if saved.get("model") and saved["model"].get("arch") != cfg.model.arch:
            raise ConfigError(f"checkpoint {path} has model.arch={saved['model'].get('arch')!r}, "
                              f"config has {cfg.model.arch!r}")
        if ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise ConfigError(f"checkpoint {path} was written with {ckpt['steps_per_epoch']} steps per epoch, "
                              f"this run has {self.steps_per_epoch} (different data, batch size or world size)")
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.start_epoch = int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.last_eval = dict(ckpt.get("last_eval", {}))
        rng = ckpt.get("rng", {}).get(self.rank) if isinstance(ckpt.get("rng"), dict) else None
        if rng is not None:
            _set_rng_state(rng)
        if self.is_main:
            print(f"[fastmask] resumed from {path}: epoch {self.start_epoch}, step {self.step}")

    # -------------------------------------------------------------------------------- state
    def schedules(self, step: int):
        o = self.cfg.optim
        lr = cosine_schedule(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, o.weight_decay, o.weight_decay_end)
        momentum = cosine_schedule(step, self.total_steps, o.teacher_momentum, o.teacher_momentum_end)
        return lr, wd, momentum

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def save_checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        """Write ``checkpoint.pt`` atomically; ``epoch``/``batch_in_epoch`` say where to continue."""
        rng = {self.rank: _rng_state()}
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rng = {k: v for d in gathered for k, v in d.items()}
        if self.is_main:
            atomic_save({
                "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "loader_epoch": epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "rng": rng,
                "last_eval": self.last_eval,
                "config": config_to_dict(self.cfg),
                "fastmask_version": __import__("fastmask").__version__,
            }, self.ckpt_path)
        if self.world > 1:
            dist.barrier()

    def log(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        self.history.append(record)
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record.get("step", self.step))

    # -------------------------------------------------------------------------------- loop
    def train_step(self, batch, epoch: int) -> Dict[str, Any]:
        cfg = self.cfg
        step = self.step
        lr, wd, momentum = self.schedules(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("apply_wd", group["weight_decay"] > 0):
                group["weight_decay"] = wd
        # Everything random inside the step is a function of (seed, step, rank): exact resume.
        torch.manual_seed(step_seed(cfg.seed, step, self.rank))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(step_seed(cfg.seed, step, self.rank, "mask"))
        state = StepState(
            epoch=epoch, step=step, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
            progress=step / self.total_steps, lr=lr, wd=wd, teacher_momentum=momentum,
            backward=self._backward, device=self.device, generator=gen, amp_dtype=self.amp_dtype,
            freeze_last_layer=epoch < cfg.optim.freeze_last_layer_epochs, rank=self.rank,
            world_size=self.world)
        self.method.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, metrics = self.method.training_step(batch, state)
        if not self.method_cls.manual_backward:
            self._backward(loss)
        _all_reduce_grads(self.trainable, self.world)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if cfg.optim.clip_grad > 0:
            grad_norm = clip_gradients(self.trainable, cfg.optim.clip_grad, cfg.optim.clip_mode)
        if state.freeze_last_layer:
            self.method.cancel_last_layer_grads(state)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.on_after_optimizer_step(state)
        self.step += 1
        return {"loss": loss.detach(), "lr": lr, "wd": wd, "teacher_momentum": momentum,
                "grad_norm": grad_norm, **(metrics or {})}

    def evaluate(self, epoch: int) -> Dict[str, float]:
        """k-NN accuracy on the val split (features of the train split as memory) + attention maps."""
        if self.world > 1:
            dist.barrier()
        result: Dict[str, float] = {}
        if self.is_main:
            cfg = self.cfg
            backbone = self.method.eval_backbone()
            was_training = backbone.training
            backbone.eval()
            t0 = time.perf_counter()
            train_eval = _make_loader(cfg, "train", "eval", shard_id=0, num_shards=1, device=self.device)
            val_eval = _make_loader(cfg, "val", "eval", shard_id=0, num_shards=1, device=self.device)
            tr_f, tr_y = extract_features(backbone, train_eval, self.device, self.amp_dtype, cfg.knn_max_train)
            va_f, va_y = extract_features(backbone, val_eval, self.device, self.amp_dtype)
            result = knn_accuracy(tr_f, tr_y, va_f, va_y, self.num_classes, cfg.knn_k, cfg.knn_temperature)
            result["eval_seconds"] = time.perf_counter() - t0
            if cfg.attn_images > 0:
                images = _pick_images(val_eval, cfg.attn_images).to(self.device)
                path = save_attention_maps(backbone, images,
                                           os.path.join(self.out_dir, "attention", f"epoch{epoch + 1:04d}.png"),
                                           self.amp_dtype)
                if path:
                    result_path = os.path.relpath(path, self.out_dir)
                    print(f"[fastmask] attention maps: {os.path.join(self.out_dir, result_path)}")
            backbone.train(was_training)
            self.log({"event": "eval", "epoch": epoch + 1, "step": self.step, **result})
        if self.world > 1:
            obj = [result]
            dist.broadcast_object_list(obj, src=0)
            result = obj[0]
        self.last_eval = result
        return result

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        stop_at = cfg.max_steps if cfg.max_steps > 0 else self.total_steps
        bar = None
        if self.is_main and cfg.progress_bar:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=min(stop_at, self.total_steps), initial=self.step, unit="step",
                           dynamic_ncols=True, disable=None)
            except ImportError:
                bar = None
        t_run = time.perf_counter()
        loss_sum, n_loss, last = None, 0, {}
        window_images, window_t0 = 0, time.perf_counter()
        epoch = self.start_epoch
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.step >= stop_at:
                break
            _set_loader_epoch(self.train_loader, epoch)
            skip = self.batch_in_epoch if epoch == self.start_epoch else 0
            done_in_epoch = skip
            t_epoch = time.perf_counter()
            epoch_images = 0
            for batch_idx, batch in enumerate(self.train_loader):
                if batch_idx < skip:
                    continue  # resumed mid-epoch: the loader's order is a function of (seed, epoch)
                batch = _to_device(batch, self.device)
                n_img = _batch_size(batch) * self.world
                out = self.train_step(batch, epoch)
                if self._old_value_checks is None:
                    from . import ops

                    self._old_value_checks = ops.set_value_checks(cfg.value_checks)
                done_in_epoch = batch_idx + 1
                loss_sum = out["loss"] if loss_sum is None else loss_sum + out["loss"]
                n_loss += 1
                window_images += n_img
                epoch_images += n_img
                if self.step % cfg.log_every == 0 or self.step == stop_at:
                    loss_val = (loss_sum / n_loss).item()
                    if not math.isfinite(loss_val):
                        raise FloatingPointError(f"loss is {loss_val} at step {self.step}; stopping "
                                                 f"(try a lower optim.lr or amp=off)")
                    dt = max(1e-9, time.perf_counter() - window_t0)
                    ips = window_images / dt
                    last = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in out.items()
                            if v is not None}
                    last["loss"] = loss_val
                    self.log({"step": self.step, "epoch": epoch + done_in_epoch / self.steps_per_epoch,
                              "images_per_s": ips, **last})
                    if bar is not None and not bar.disable:
                        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{out['lr']:.2e}", img_s=f"{ips:.1f}",
                                        epoch=epoch + 1)
                    elif self.is_main and cfg.progress_bar:  # no terminal (e.g. a log file): plain lines
                        print(f"[fastmask] step {self.step}/{stop_at} epoch {epoch + 1} loss {loss_val:.4f} "
                              f"lr {out['lr']:.2e} {ips:.1f} img/s", flush=True)
                    loss_sum, n_loss, window_images, window_t0 = None, 0, 0, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if self.step >= stop_at:
                    break
            self.batch_in_epoch = 0
            if done_in_epoch < self.steps_per_epoch:
                # stopped (max_steps) in the middle of an epoch: checkpoint the exact position
                self.save_checkpoint(epoch, done_in_epoch)
                break
            if self.is_main:
                secs = time.perf_counter() - t_epoch
                self.log({"event": "epoch", "epoch": epoch + 1, "step": self.step, "epoch_seconds": secs,
                          "epoch_images_per_s": epoch_images / max(1e-9, secs)})
            last_epoch = epoch + 1 == cfg.epochs
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last_epoch:
                res = self.evaluate(epoch)
                if self.is_main:
                    msg = ", ".join(f"{k} {v:.2f}" for k, v in res.items() if k.startswith("knn"))
                    (bar.write if bar is not None else print)(f"[fastmask] epoch {epoch + 1}: k-NN {msg}")
            if (epoch + 1) % cfg.save_every == 0 or last_epoch or self.step >= stop_at:
                self.save_checkpoint(epoch + 1, 0)
        if bar is not None:
            bar.close()
        self.check_ranks_in_sync()
        wall = time.perf_counter() - t_run
        summary = {"event": "end", "step": self.step, "epoch": epoch + 1, "wall_seconds": wall,
                   **{k: v for k, v in self.last_eval.items()}, "final_loss": last.get("loss")}
        self.log(summary)
        if self.is_main:
            knn = self.last_eval.get("knn_top1")
            if knn is not None:
                print(f"[fastmask] done: {self.step} steps in {wall:.1f}s; k-NN top-1 {knn:.2f}% "
                      f"(k={cfg.knn_k}, T={cfg.knn_temperature}) -> {self.out_dir}")
            else:
                print(f"[fastmask] stopped at step {self.step} after {wall:.1f}s; checkpoint {self.ckpt_path}")
        self.close()
        return summary

    @torch.no_grad()
    def check_ranks_in_sync(self) -> None:
        """Under DDP every rank must hold the same parameters; a drift means a bug, so fail loudly."""
        if self.world <= 1:
            return
        local = torch.stack([p.detach().double().sum() for p in self.method.parameters()]).to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        for r, other in enumerate(gathered):
            if not torch.allclose(other, gathered[0], rtol=1e-6, atol=1e-6):
                raise RuntimeError(f"rank {r} parameters differ from rank 0 after training")

    def close(self) -> None:
        if self._old_value_checks is not None:
            from . import ops

            ops.set_value_checks(self._old_value_checks)
            self._old_value_checks = None
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._owns_pg and dist.is_initialized():
            # Tear gloo down together: a rank that destroys its group and exits while a peer is still
            # finishing (rank 0 logs and prints after the last collective) made that peer abort with
            # "terminate called without an active exception" in about 1 of 30 two-rank runs.
            # close() runs only after a completed fit, so every rank reaches this barrier.
            dist.barrier()
            dist.destroy_process_group()
            self._owns_pg = False


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run one training from a validated config; returns the final summary (incl. k-NN accuracy)."""
    return Trainer(cfg).fit()


# ------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmask.train",
        description="Train a masked ViT with one of fastmask's methods. With no arguments: DINO with "
                    "random masking of the student's global views on the built-in shapes dataset.",
        epilog="Overrides: dotted key=value pairs, e.g. optim.lr=1e-3 epochs=10 model.arch=vit_small "
               "method.student_mask_ratio=0.3 data.batch_size=64",
    )
    p.add_argument("--method", choices=method_names(), default=None, help="training method (default: dino)")
    p.add_argument("--config", default=None,
                   help="YAML recipe: a path or a name under fastmask/recipes (default: dino_tiny_builtin)")
    p.add_argument("--data", default=None, help="dataset: an ImageFolder root or builtin:NAME")
    p.add_argument("--output-dir", default=None, help="where checkpoints and logs go")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from output_dir/checkpoint.pt (or the given checkpoint)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value pairs may come before or after options
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    try:
        cfg = load_config(method=args.method, config=args.config, overrides=overrides, data=args.data)
    except ConfigError as e:
        print(f"fastmask.train: configuration error: {e}", file=sys.stderr)
        return 2
    summary = train(cfg)
    return 0 if summary is not None else 1


if __name__ == "__main__":
    sys.exit(main())
