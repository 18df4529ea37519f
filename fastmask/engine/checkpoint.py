"""Checkpoints: one file (``checkpoint.pt``) written atomically, with every rank's RNG state, the
global step and the position in the epoch, so that a killed run resumes to the same parameters."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Dict

import numpy as np
import torch

from ..config import ConfigError

__all__ = ["CHECKPOINT_NAME", "atomic_save", "rng_state", "set_rng_state", "read_checkpoint",
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


def read_checkpoint(path: str) -> Dict[str, Any]:
    # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
    return torch.load(path, map_location="cpu", weights_only=False)


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
