"""Every check a training run can fail on, before anything is written to its output directory.

``preflight(cfg, world)`` validates the data section, the device and AMP, the model and teacher
names, the dataset (path, split folders, enough images for one batch), the output directory (a
fresh run never mixes with another run's files) and the checkpoint to resume from (readable,
same method/architecture/batch/steps per epoch).  Problems raise :class:`UsageError` with one line
that says how to fix them; ``python -m fastmask.train`` prints it and exits with status 2.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .._cli import UsageError, unreadable_checkpoint
from ..config import ConfigError

__all__ = ["Preflight", "preflight", "RUN_FILES", "PREV_CHECKPOINT_NAME", "run_files_in",
           "clear_run", "remove_stale_tmp", "read_checkpoint_or_explain", "truncate_metrics"]

PREV_CHECKPOINT_NAME = "checkpoint.prev.pt"
# What a run writes into its output directory (--overwrite removes exactly these).
RUN_FILES = ("checkpoint.pt", PREV_CHECKPOINT_NAME, "metrics.jsonl", "config.yaml", "tb", "attention")


@dataclass
class Preflight:
    """What the checks found: the checkpoint to resume from (already read) and its step."""

    steps_per_epoch: int
    resume_path: Optional[str] = None
    checkpoint: Optional[Dict[str, Any]] = None
    resume_step: Optional[int] = None  # the checkpoint's step; 0 when resume=auto found none in a used dir


def run_files_in(out_dir: str):
    return [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]


def clear_run(out_dir: str) -> None:
    """--overwrite: remove a previous run's files (nothing else in the folder)."""
    import shutil

    for name in run_files_in(out_dir):
        p = os.path.join(out_dir, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    remove_stale_tmp(out_dir)


def remove_stale_tmp(out_dir: str) -> int:
    """Temporary checkpoint files of writes that were killed mid-way (``checkpoint.pt.tmp.PID``)."""
    n = 0
    for p in glob.glob(os.path.join(glob.escape(out_dir), "checkpoint*.pt.tmp.*")):
        try:
            os.remove(p)
            n += 1
        except OSError:
            pass
    return n


def read_checkpoint_or_explain(path: str) -> Dict[str, Any]:
    """torch.load a driver checkpoint; an unreadable one is a UsageError naming the file, what is
    wrong and, when there is one, the previous good checkpoint to resume from instead."""
    import torch

    if os.path.isdir(path):
        raise UsageError(f"resume: {path!r} is a directory, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # zip-reader errors, EOFError, unpickling errors: all mean "bad file"
        msg = unreadable_checkpoint(path, exc)
        prev = os.path.join(os.path.dirname(os.path.abspath(path)), PREV_CHECKPOINT_NAME)
        if os.path.abspath(path) != prev and os.path.isfile(prev):
            msg += f"; the previous checkpoint is kept: resume from it with --resume {prev}"
        raise UsageError(msg) from None
    if not isinstance(ckpt, dict) or "method" not in ckpt or "step" not in ckpt:
        raise UsageError(f"checkpoint {path!r} is not a fastmask.train checkpoint (no 'method'/'step' entries); "
                         f"to initialise the backbone from weights use model.checkpoint=PATH")
    return ckpt


def _check_data_section(cfg) -> None:
    from ..data import check_data_config

    try:
        check_data_config(cfg.data, prefix="data.")
    except (ValueError, RuntimeError) as e:  # a field out of range, DALI asked for but not importable
        raise UsageError(str(e)) from None


def _check_device(cfg, local_rank: int):
    from . import distributed as D
    from .loop import amp_dtype_for

    try:
        device = D.resolve_device(cfg.device, local_rank)
    except ConfigError as e:  # cuda asked for, none visible
        raise UsageError(f"{e}; use device=cpu or device=auto") from None
    if device.type == "cuda" and device.index is not None and device.index >= _cuda_count():
        raise UsageError(f"device={cfg.device}: only {_cuda_count()} CUDA device(s) are visible")
    try:
        amp_dtype_for(cfg.amp, device)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return device


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def _check_arch(key: str, name: str) -> None:
    from ..models.vit import _NAME_RE, _unknown_name, vit_names

    if _NAME_RE.match(name):
        return
    from timm.models import split_model_name_tag

    if split_model_name_tag(name)[0] not in vit_names():
        raise UsageError(f"{key}: {_unknown_name(name)}")


def _check_models(cfg) -> None:
    _check_arch("model.arch", cfg.model.arch)
    teacher = getattr(cfg.method, "teacher", None)
    if teacher is not None and getattr(teacher, "arch", None):
        _check_arch("method.teacher.arch", teacher.arch)


def _check_data_source(cfg, world: int) -> int:
    """The dataset exists and gives at least one batch per process; returns steps per epoch."""
    from ..data import resolve_data_root
    from ..data.folder import ShardPlan, scan_image_folder

    where = f"--data {cfg.data.data}"
    try:
        root = resolve_data_root(cfg.data)
    except ValueError as e:  # builtin:unknown, bad builtin option
        raise UsageError(f"{where}: {e}") from None
    from ..data.webdataset import is_shard_split, scan_shards

    if is_shard_split(root, "train"):  # webdataset .tar shards: whole tars per rank
        try:
            split, val = scan_shards(root, "train"), scan_shards(root, "val")
            plan = ShardPlan.of_tars(split.shard_sizes, int(cfg.data.batch_size), 0, world, cfg.seed, True, True)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{where}: {e}") from None
        return len(plan)
    try:
        split = scan_image_folder(root, "train", validate=cfg.data.validate, cache_dir=cfg.data.cache_dir)
        val = scan_image_folder(root, "val", validate=cfg.data.validate, cache_dir=cfg.data.cache_dir)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"{where}: {e} (give an ImageFolder root with train/ and val/, or builtin:shapes)") from None
    except ValueError as e:  # DatasetError: no classes, no usable image
        raise UsageError(f"{where}: {e}") from None
    if len(val.files) == 0:
        raise UsageError(f"{where}: the val split has no usable image (k-NN evaluation needs some)")
    try:
        plan = ShardPlan(len(split.files), int(cfg.data.batch_size), 0, world, cfg.seed, True, True)
    except ValueError as e:
        raise UsageError(f"{where}: {e}; lower data.batch_size") from None
    accum = cfg.optim.accum_steps
    if len(plan) < accum:
        raise UsageError(f"{where}: {len(plan)} batch(es) per process and epoch, fewer than optim.accum_steps={accum}; "
                         f"lower data.batch_size or optim.accum_steps")
    return len(plan) // accum


def _check_output_dir(cfg) -> Optional[str]:
    """A fresh run never writes into another run's directory; returns the checkpoint to resume."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"output_dir: {out!r} exists and is not a directory")
    used = run_files_in(out) if os.path.isdir(out) else []
    ckpt = os.path.join(out, "checkpoint.pt")
    if cfg.resume == "auto":
        if os.path.isfile(ckpt):
            return ckpt
        prev = os.path.join(out, PREV_CHECKPOINT_NAME)
        if os.path.isfile(prev):
            raise UsageError(f"resume: {out!r} has no checkpoint.pt but keeps {PREV_CHECKPOINT_NAME}; "
                             f"resume from it with --resume {prev}, or start over with --overwrite")
        return None
    if cfg.resume:
        return cfg.resume
    if used and not getattr(cfg, "overwrite", False):
        raise UsageError(f"output_dir {out!r} already holds a run ({', '.join(used)}); continue it with --resume, "
                         f"start over with --overwrite (deletes those files) or pick another --output-dir")
    return None


def _check_resume(cfg, path: str, steps_per_epoch: int, world: int) -> Dict[str, Any]:
    from .checkpoint import check_compatible

    ckpt = read_checkpoint_or_explain(path)
    saved = ckpt.get("config") or {}
    hint = f" (resume with the run's own settings, or start a new run with another --output-dir)"
    # Another world size or accumulation is fine (full state dicts, per-step seeds) as long as the
    # global batch, data.batch_size x processes x optim.accum_steps, is the same.
    saved_bs = (saved.get("data") or {}).get("batch_size")
    rng = ckpt.get("rng")
    saved_world = int(ckpt.get("world_size") or (len(rng) if isinstance(rng, dict) and rng else 1))
    saved_accum = int((saved.get("optim") or {}).get("accum_steps", 1))
    if saved_bs is not None:
        before = int(saved_bs) * saved_world * saved_accum
        now = int(cfg.data.batch_size) * world * cfg.optim.accum_steps
        if before != now:
            raise UsageError(f"resume: checkpoint {path} was trained with a global batch of {before} (data.batch_size="
                             f"{saved_bs} x {saved_world} process(es) x optim.accum_steps={saved_accum}), this run has "
                             f"{now} (data.batch_size={cfg.data.batch_size} x {world} x {cfg.optim.accum_steps}){hint}")
    saved_model = saved.get("model") or {}
    for k in ("arch", "patch_size", "img_size", "depth", "embed_dim", "num_heads"):
        if k in saved_model and saved_model[k] != getattr(cfg.model, k):
            raise UsageError(f"resume: checkpoint {path} has model.{k}={saved_model[k]!r}, this run has "
                             f"model.{k}={getattr(cfg.model, k)!r}{hint}")
    try:
        check_compatible(ckpt, path, cfg, steps_per_epoch)
    except ConfigError as e:
        raise UsageError(f"resume: {e}{hint}") from None
    return ckpt


def preflight(cfg, world: int = 1, local_rank: int = 0) -> Preflight:
    """Run every check; raise UsageError (one line) on the first problem.  Writes nothing except
    a built-in dataset's cache on its first use (under data.cache_dir, not the output directory)."""
    _check_data_section(cfg)
    _check_device(cfg, local_rank)
    _check_models(cfg)
    if getattr(cfg, "wandb", False) and getattr(cfg, "wandb_mode", "online") != "disabled":
        from .loggers import wandb_available

        if not wandb_available():
            raise UsageError("wandb=true: the wandb package is not installed; `pip install wandb` or set wandb=false")
    steps = _check_data_source(cfg, world)
    path = _check_output_dir(cfg)
    result = Preflight(steps_per_epoch=steps)
    if path is not None:
        result.resume_path = path
        result.checkpoint = _check_resume(cfg, path, steps, world)
        result.resume_step = int(result.checkpoint["step"])
    elif cfg.resume == "auto" and os.path.isdir(cfg.output_dir) and run_files_in(cfg.output_dir):
        result.resume_step = 0  # killed before its first checkpoint: its records are dropped
    return result


def truncate_metrics(path: str, step: int) -> int:
    """Drop the records after ``step`` from a metrics.jsonl (a resumed run re-logs them); returns
    how many were dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                dropped += 1  # a line cut off by a kill
                continue
            if isinstance(rec_step, (int, float)) and rec_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped
