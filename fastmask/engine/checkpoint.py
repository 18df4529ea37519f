"""Checkpoints: one file (``checkpoint.pt``) written atomically, with every rank's RNG state, the
global step and the position in the epoch, so that a killed run resumes to the same parameters."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Dict, Tuple

import numpy as np
import torch

from ..config import ConfigError

__all__ = ["CHECKPOINT_NAME", "atomic_save", "rng_state", "set_rng_state", "full_state", "load_full_state",
           "check_compatible"]

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_save(obj, path: str, keep_previous: bool = False) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file.

    ``keep_previous``: the file being replaced becomes ``<name>.prev.pt`` (``checkpoint.prev.pt``),
    the last good checkpoint offered when the newest one cannot be read."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a failed write (disk full, ^C) leaves no partial file behind
        raise
    if keep_previous and os.path.isfile(path):
        os.replace(path, os.path.splitext(path)[0] + ".prev.pt")
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(method: torch.nn.Module, optimizer) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model, optimizer) state dicts in the single-process layout whatever the parallelism: full
    tensors (FSDP shards gathered) on the CPU, optimizer state keyed by parameter name, so that a
    checkpoint of any world size loads into any other.  Collective: every rank calls it; ranks > 0
    get empty dicts under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(cpu_offload=True)
    return get_model_state_dict(method, options=opts), get_optimizer_state_dict(method, optimizer, options=opts)


def load_full_state(method: torch.nn.Module, optimizer, model_state: Dict[str, Any],
                    optim_state: Dict[str, Any]) -> None:
    """Inverse of :func:`full_state`: every rank loads the full dicts (and keeps its own shards)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(method, model_state, options=_options())
    # strict=False: a parameter that has had no gradient yet (DINO's last layer while frozen) has no
    # optimizer state, exactly as in the uninterrupted run; strict loading refuses such checkpoints.
    set_optimizer_state_dict(method, optimizer, optim_state, options=_options(strict=False))


def check_compatible(ckpt: Dict[str, Any], path: str, cfg, steps_per_epoch: int) -> None:
    """A checkpoint continues this run only with the same method, architecture and steps per epoch."""
    saved = ckpt.get("config", {})
    if saved.get("method") not in (None, cfg.method_name):
        raise ConfigError(f"checkpoint {path} is a {saved.get('method')!r} run, not {cfg.method_name!r}")
    if saved.get("model") and saved["model"].get("arch") != cfg.model.arch:
        raise ConfigError(f"checkpoint {path} has model.arch={saved['model'].get('arch')!r}, "
                          f"config has {cfg.model.arch!r}")
    if ckpt.get("steps_per_epoch") not in (None, steps_per_epoch):
        raise ConfigError(f"checkpoint {path} was written with {ckpt['steps_per_epoch']} steps per epoch, "
                          f"this run has {steps_per_epoch} (different data, batch size or world size)")
