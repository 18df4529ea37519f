"""The training loop: ``Trainer(cfg).fit()``.

The trainer owns AdamW with linear warm-up + cosine decay (lr scaled by global batch/256), the
weight-decay and teacher-momentum cosine schedules, AMP (bf16 autocast on GPU), gradient clipping,
freezing of the last head layer, ``torch.compile``, data parallelism, checkpoints with exact resume,
logging (progress bar, JSON lines, TensorBoard) and evaluation.  A method (``fastmask.methods``)
only turns a batch into a loss.

Exact resume: every source of randomness inside a step (drop-path, mask policies) is reseeded from
``(seed, step, rank)`` at the start of the step, and the loader's order/augmentation is a function
of ``(seed, epoch)``; a checkpoint stores the global step, so a killed run resumed from its last
checkpoint reproduces the uninterrupted run's parameters.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .._cli import UsageError
from ..config import ConfigError, TrainConfig, config_to_dict
from ..methods import get_method
from ..methods.base import Method, StepState
from . import checkpoint as ckpt_io
from . import distributed as D
from .auto_teacher import resolve_auto_teacher
from .compile import compile_step
from .data import batch_size, make_loader, num_classes, set_loader_epoch, to_device
from .evaluation import evaluate
from .guard import NonFiniteGuard, amp_policy, grad_norm as global_grad_norm
from .loggers import RunLog
from .optim import clip_gradients, cosine_schedule, make_optimizer
from .preflight import clear_run, preflight, remove_stale_tmp, run_files_in
from .progress import progress_bar

__all__ = ["Trainer", "train", "cosine_schedule", "step_seed", "make_optimizer", "amp_dtype_for"]


# ------------------------------------------------------------------------------------ pieces

def step_seed(seed: int, step: int, rank: int = 0, stream: str = "") -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank): the basis of exact resume."""
    h = hashlib.blake2b(f"{seed}:{step}:{rank}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def amp_dtype_for(pref: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp=pref`` on ``device`` (``guard.amp_policy``: bf16 on GPUs with
    native bf16, fp16 + loss scaling on older ones, float32 on the CPU)."""
    try:
        return amp_policy(device, pref).dtype
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _mean_metrics(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-micro-batch metrics averaged (numbers and tensors); the first one's other values."""
    if len(parts) == 1:
        return dict(parts[0])
    out = dict(parts[0])
    for k, v in parts[0].items():
        vals = [p.get(k) for p in parts]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            out[k] = sum(vals) / len(vals)
        elif all(isinstance(x, torch.Tensor) for x in vals):
            out[k] = torch.stack([x.detach().float() for x in vals]).mean(0)
    return out


@contextlib.contextmanager
def _fsdp_no_sync(method: torch.nn.Module):
    """FSDP2: accumulate unsharded-reduced gradients locally for a micro-batch (no reduce-scatter)."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in method.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True, recurse=False)


# ------------------------------------------------------------------------------------ trainer

class Trainer:
    """One training run; ``Trainer(cfg).fit()`` returns the final metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = D.init_distributed(cfg.device)
        self.rank, self.world, self.is_main = self.dist.rank, self.dist.world, self.dist.is_main
        # Every user mistake fails here, in one line, before anything is written (engine.preflight),
        # on every rank together; no rank writes before every rank has seen the output dir unused.
        checked = D.check_on_every_rank(lambda: preflight(cfg, self.world, self.dist.local_rank), self.dist)
        resolve_auto_teacher(cfg, self.world, self.rank)  # method.teacher.checkpoint=auto: cached, else trained once
        self.device = D.resolve_device(cfg.device, self.dist.local_rank)
        self.amp_dtype = amp_dtype_for(cfg.amp, self.device)
        self.method_cls = get_method(cfg.method_name)
        self.out_dir = cfg.output_dir
        self.ckpt_path = os.path.join(self.out_dir, ckpt_io.CHECKPOINT_NAME)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # Data first: it fails early on an unusable dataset and tells us the number of classes.
        self.train_loader = make_loader(cfg, "train", self.method_cls.pipeline, shard_id=self.rank,
                                        num_shards=self.world, device=self.device)
        self.num_classes = num_classes(self.train_loader)
        self.accum = cfg.optim.accum_steps
        self.steps_per_epoch = len(self.train_loader) // self.accum  # a last partial step is dropped
        if self.steps_per_epoch < 1:
            raise RuntimeError(f"the training loader yields {len(self.train_loader)} batches, fewer than "
                               f"optim.accum_steps={self.accum} (dataset smaller than one step?)")
        self.total_steps = cfg.epochs * self.steps_per_epoch

        # Same init on every rank (seeded), broadcast anyway so ranks can never drift.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        random.seed(cfg.seed)
        self.method: Method = self.method_cls(cfg, self.num_classes).to(self.device)
        D.broadcast_module(self.method)
        # What runs the step: the method itself, or DDP around its trained modules; FSDP shards in place.
        self.fsdp = self.world > 1 and cfg.parallel == "fsdp"
        self.ddp = None
        if self.fsdp:
            D.shard_fsdp(self.method, cfg.fsdp_mixed_precision)
            if cfg.fsdp_mixed_precision and self.amp_dtype is None:
                # bf16 parameters meet float32 tensors between FSDP units (heads, losses): autocast
                # is what makes them agree (on a GPU amp=auto is bf16 already).
                self.amp_dtype = torch.bfloat16
        elif self.world > 1:
            self.ddp = D.wrap_ddp(self.method, cfg.ddp_bucket_mb)
        self.trainable = [p for g in self.method.param_groups(0.0) for p in g["params"]]
        # compile=none|blocks|step: forward, loss and backward of a micro-batch (fastmask/engine/compile.py).
        self.step_fn = compile_step(self.method, cfg.compile, compile_mode=cfg.compile_mode or None,
                                    forward=self.ddp)

        self.global_batch = self._global_batch_size()
        scale = self.global_batch / 256.0 if cfg.optim.scale_lr_by_batch else 1.0
        self.peak_lr = cfg.optim.lr * scale
        self.min_lr = cfg.optim.min_lr * scale if cfg.optim.scale_min_lr else cfg.optim.min_lr
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.optimizer = make_optimizer(self.method.param_groups(cfg.optim.weight_decay, cfg.optim.decay_groups),
                                        self.peak_lr, tuple(cfg.optim.betas), self.device, cfg.optim.optimizer.lower())
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.guard = NonFiniteGuard(cfg.nonfinite_max_consecutive, enabled=cfg.skip_nonfinite)
        self._old_value_checks = None
        self.step = 0
        self.start_epoch = 0
        self.batch_in_epoch = 0
        self.last_eval: Dict[str, float] = {}
        self._resume(checked)

        if self.is_main:
            self._open_output_dir(checked)
        self.log_sink = RunLog(self.out_dir, self.is_main, cfg.tensorboard, purge_step=checked.resume_step)
        self.wandb = None
        if cfg.wandb and self.is_main:
            from .loggers import WandbLogger

            self.wandb = WandbLogger(project=cfg.wandb_project, entity=cfg.wandb_entity or None,
                                     name=os.path.basename(os.path.normpath(self.out_dir)),
                                     config=config_to_dict(cfg), dir=self.out_dir, mode=cfg.wandb_mode)
        if self.is_main:
            import yaml

            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.log_sink.history

    # -------------------------------------------------------------------------------- setup
    def _global_batch_size(self) -> int:
        bs = getattr(self.cfg.data, "batch_size", None)
        if bs is None:
            bs = getattr(self.train_loader, "batch_size", None)
        if bs is None:
            raise RuntimeError("cannot tell the batch size (DataConfig.batch_size or loader.batch_size)")
        return int(bs) * self.world * self.accum

    def _open_output_dir(self, checked) -> None:
        """Rank 0, after every check and set-up step: --overwrite clears the previous run's files;
        temporary files of killed checkpoint writes are removed."""
        if self.cfg.overwrite and checked.resume_path is None and os.path.isdir(self.out_dir):
            used = run_files_in(self.out_dir)
            if used:
                clear_run(self.out_dir)
                print(f"[fastmask] --overwrite: removed the previous run's {', '.join(used)} from {self.out_dir}")
        os.makedirs(self.out_dir, exist_ok=True)
        stale = remove_stale_tmp(self.out_dir)
        if stale:
            print(f"[fastmask] removed {stale} temporary checkpoint file(s) of interrupted writes")

    def _resume(self, checked) -> None:
        path, ckpt = checked.resume_path, checked.checkpoint
        if ckpt is None:
            if self.cfg.resume == "auto" and self.is_main:
                print(f"[fastmask] resume=auto: no checkpoint in {self.out_dir}, starting fresh")
            return
        if self.steps_per_epoch != checked.steps_per_epoch:  # the loader and the preflight disagree: a bug
            ckpt_io.check_compatible(ckpt, path, self.cfg, self.steps_per_epoch)
        try:  # full state dicts, whatever world size or parallelism wrote them
            ckpt_io.load_full_state(self.method, self.optimizer, ckpt["method"], ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"resume: checkpoint {path} does not fit this run's model/optimizer "
                             f"({str(e).splitlines()[0][:160]}); resume with the run's own settings") from None
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.start_epoch = int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.last_eval = dict(ckpt.get("last_eval", {}))
        self.guard.load_state_dict(ckpt.get("nonfinite", {}))
        rng = ckpt.get("rng", {}).get(self.rank) if isinstance(ckpt.get("rng"), dict) else None
        if rng is not None:
            ckpt_io.set_rng_state(rng)
        if self.is_main:
            print(f"[fastmask] resuming the run in {self.out_dir} from {path}: epoch {self.start_epoch}, "
                  f"step {self.step} (records after step {self.step} are dropped from its logs)")

    def save_checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        """Write ``checkpoint.pt`` atomically; ``epoch``/``batch_in_epoch`` say where to continue."""
        rng = {self.rank: ckpt_io.rng_state()}
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rng = {k: v for d in gathered for k, v in d.items()}
        model_state, optim_state = ckpt_io.full_state(self.method, self.optimizer)
        if self.is_main:
            ckpt_io.atomic_save({
                "method": model_state,
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "loader_epoch": epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world,
                "rng": rng,
                "last_eval": self.last_eval,
                "nonfinite": self.guard.state_dict(),
                "config": config_to_dict(self.cfg),
                "fastmask_version": __import__("fastmask").__version__,
            }, self.ckpt_path, keep_previous=True)
        D.barrier(self.world)

    def log(self, record: Dict[str, Any]) -> None:
        self.log_sink(record, self.step)
        if self.wandb is not None:
            self.wandb.log(record, self.step)

    # -------------------------------------------------------------------------------- step
    def schedules(self, step: int):
        o = self.cfg.optim
        lr = cosine_schedule(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, o.weight_decay, o.weight_decay_end)
        momentum = cosine_schedule(step, self.total_steps, o.teacher_momentum, o.teacher_momentum_end)
        return lr, wd, momentum

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accum > 1:
            loss = loss / self.accum  # the mean over micro-batches, as over one large batch
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _step_state(self, epoch: int, lr: float, wd: float, momentum: float, micro: int = 0) -> StepState:
        # Everything random inside the step is a function of (seed, step, slice of the global batch):
        # exact resume.  Micro-batch m of rank r is slice m * world + r, so 1 process accumulating
        # 2 micro-batches draws what 2 processes draw.
        cfg, step, part = self.cfg, self.step, micro * self.world + self.rank
        torch.manual_seed(step_seed(cfg.seed, step, part))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(step_seed(cfg.seed, step, part, "mask"))
        return StepState(
            epoch=epoch, step=step, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
            progress=step / self.total_steps, lr=lr, wd=wd, teacher_momentum=momentum,
            backward=self._backward, device=self.device, generator=gen, amp_dtype=self.amp_dtype,
            freeze_last_layer=epoch < cfg.optim.freeze_last_layer_epochs, rank=self.rank,
            world_size=self.world, defer_last_backward=True)

    def _clip_gradients(self) -> Optional[torch.Tensor]:
        if self.cfg.optim.clip_grad > 0:
            norm = clip_gradients(self.trainable, self.cfg.optim.clip_grad, self.cfg.optim.clip_mode)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        return None

    def _forward_backward(self, batch, state: StepState):
        """One micro-batch: the method's step (through DDP when there is one) and the backward of
        the loss it returns.  ``sync``: False on all but the last micro-batch of an accumulated step."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return self.step_fn(batch, state)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _no_sync(self, last: bool):
        """Gradient sync only on the last micro-batch of a step (DDP's no_sync, FSDP2's
        set_requires_gradient_sync): one averaged gradient per optimizer step."""
        if last or self.world == 1:
            return contextlib.nullcontext()
        if self.ddp is not None:
            return self.ddp.no_sync()
        return _fsdp_no_sync(self.method)

    def train_step(self, batches, epoch: int) -> Dict[str, Any]:
        """One optimizer step over ``batches`` (``optim.accum_steps`` micro-batches; one batch is
        accepted when accum_steps is 1)."""
        if not isinstance(batches, list) or self.accum == 1 and len(batches) != 1:
            batches = [batches]
        if len(batches) != self.accum:
            raise ValueError(f"train_step needs optim.accum_steps={self.accum} micro-batches, got {len(batches)}")
        lr, wd, momentum = self.schedules(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("apply_wd", group["weight_decay"] > 0):
                group["weight_decay"] = wd
        self.method.train()
        self.guard.save_buffers(self.method)  # a skipped step restores them (BatchNorm statistics)
        losses, parts = [], []
        for micro, batch in enumerate(batches):
            state = self._step_state(epoch, lr, wd, momentum, micro)
            with self._no_sync(last=micro == len(batches) - 1):
                loss, metrics = self._forward_backward(batch, state)
            losses.append(loss.detach())
            parts.append(metrics or {})
        metrics = _mean_metrics(parts)
        loss = metrics.pop("loss", None)
        loss = torch.stack(losses).mean() if loss is None else loss
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        # A non-finite loss or gradient skips the update (guard.py).  Ranks decide on the all-reduced
        # gradient norm alone, which they share (a NaN loss makes NaN gradients), so they agree.
        norm = grad_norm if grad_norm is not None else global_grad_norm(self.trainable)
        stepped = self.guard.check(loss.detach() if self.world == 1 else None, norm, step=self.step)
        if stepped:
            if state.freeze_last_layer:
                self.method.cancel_last_layer_grads(state)
            self._optimizer_step()
            self.method.on_after_optimizer_step(state)
        else:
            self.guard.skip(self.optimizer, self.scaler)
        self.step += 1
        return {"loss": loss.detach(), "lr": lr, "wd": wd, "teacher_momentum": momentum,
                "grad_norm": grad_norm, "stepped": stepped, **self.guard.metrics(), **metrics}

    # -------------------------------------------------------------------------------- eval
    def evaluate(self, epoch: int) -> Dict[str, float]:
        """k-NN accuracy and attention maps on rank 0, the result shared with every rank."""
        D.barrier(self.world)
        result: Dict[str, float] = {}
        if self.is_main or self.fsdp:  # sharded networks: every rank takes part in every forward
            result = evaluate(self.cfg, self.method, device=self.device, amp_dtype=self.amp_dtype,
                              num_classes=self.num_classes, out_dir=self.out_dir, epoch=epoch,
                              write_images=self.is_main)
        if self.is_main:
            self.log({"event": "eval", "epoch": epoch + 1, "step": self.step, **result})
        if self.world > 1:
            obj = [result]
            dist.broadcast_object_list(obj, src=0)
            result = obj[0]
        self.last_eval = result
        return result

    # -------------------------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        stop_at = cfg.max_steps if cfg.max_steps > 0 else self.total_steps
        bar = None
        if self.is_main and cfg.progress_bar:
            bar = progress_bar(total=min(stop_at, self.total_steps), initial=self.step)  # log lines print above it
        t_run = time.perf_counter()
        loss_sum, n_loss, last = None, 0, {}
        window_images, window_t0 = 0, time.perf_counter()
        epoch = self.start_epoch
        for epoch in range(self.start_epoch, cfg.epochs):
            if self.step >= stop_at:
                break
            set_loader_epoch(self.train_loader, epoch)
            # batch_in_epoch counts optimizer steps (global batches), whatever the world size or
            # accumulation that wrote it: a resumed run skips that many steps' loader batches.
            skip = (self.batch_in_epoch if epoch == self.start_epoch else 0) * self.accum
            done_in_epoch = skip // self.accum
            t_epoch = time.perf_counter()
            epoch_images = 0
            micro_batches = []
            first = 0
            if skip and hasattr(self.train_loader, "set_start_batch"):
                self.train_loader.set_start_batch(skip)  # sharded loaders skip without reading
                first = skip
            for batch_idx, batch in enumerate(self.train_loader, start=first):
                if batch_idx < skip:
                    continue  # resumed mid-epoch: the loader's order is a function of (seed, epoch)
                if done_in_epoch >= self.steps_per_epoch:
                    break  # the last batches do not fill an accumulated step
                micro_batches.append(to_device(batch, self.device))
                if len(micro_batches) < self.accum:
                    continue
                n_img = sum(batch_size(b) for b in micro_batches) * self.world
                out = self.train_step(micro_batches, epoch)
                micro_batches = []
                if self._old_value_checks is None:
                    from .. import ops

                    self._old_value_checks = ops.set_value_checks(cfg.value_checks)
                done_in_epoch += 1
                if out.pop("stepped"):  # skipped steps' (non-finite) losses stay out of the average
                    loss_sum = out["loss"] if loss_sum is None else loss_sum + out["loss"]
                    n_loss += 1
                window_images += n_img
                epoch_images += n_img
                if self.step % cfg.log_every == 0 or self.step == stop_at:
                    loss_val = (loss_sum / n_loss).item() if n_loss else float("nan")
                    if not math.isfinite(loss_val) and not self.guard.enabled:
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
                    msg = ", ".join(f"{k} {v:.2f}" for k, v in res.items() if k.startswith(("knn", "val_", "teacher_val_")))
                    (bar.write if bar is not None else print)(f"[fastmask] epoch {epoch + 1}: k-NN {msg}")
            if (epoch + 1) % cfg.save_every == 0 or last_epoch or self.step >= stop_at:
                self.save_checkpoint(epoch + 1, 0)
        if bar is not None:
            bar.close()
        D.check_ranks_in_sync(self.method, self.device, self.world if not self.fsdp else 1)  # shards differ
        wall = time.perf_counter() - t_run
        summary = {"event": "end", "step": self.step, "epoch": epoch + 1, "wall_seconds": wall,
                   **self.last_eval, "final_loss": last.get("loss")}
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

    def close(self) -> None:
        if self._old_value_checks is not None:
            from .. import ops

            ops.set_value_checks(self._old_value_checks)
            self._old_value_checks = None
        self.log_sink.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
        # close() runs only after a completed fit, so every rank reaches shutdown's barrier.
        D.shutdown(self.dist)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run one training from a checked config; returns the final summary (incl. k-NN accuracy)."""
    with D.fail_together(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))):
        return Trainer(cfg).fit()
