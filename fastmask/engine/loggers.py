"""The driver's run records: ``RunLog`` (rank 0's ``metrics.jsonl`` and TensorBoard scalars) and the
optional Weights & Biases logging beside them.

Weights & Biases is off by default.  ``WandbLogger(project=..., config=...)`` starts a run (rank 0 only: the caller
makes one logger per job) and ``log(record)`` forwards the numeric entries of each metrics record
(the same dicts that go to ``metrics.jsonl``) at ``record["step"]``; evaluation records appear
under their own keys (``knn_top1``, ...).  ``mode="offline"`` writes the run locally for a later
``wandb sync`` (clusters without internet); ``mode="disabled"`` makes every call a no-op.  Without
the ``wandb`` package, asking for it raises an ``ImportError`` that says how to install it.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from .preflight import truncate_metrics

__all__ = ["RunLog", "WANDB_MODES", "WandbLogger", "wandb_available"]

WANDB_MODES = ("online", "offline", "disabled")
_NOT_METRICS = ("step", "event")


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "Weights & Biases logging was asked for (wandb=true) but the wandb package is not installed: "
            "`pip install wandb` (or set wandb=false)") from e
    return wandb


class WandbLogger:
    """One W&B run; ``log`` takes the driver's metric records."""

    def __init__(self, *, project: str = "fastmask", entity: Optional[str] = None, name: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, dir: Optional[str] = None, mode: str = "online",
                 tags: Optional[list] = None, resume_id: Optional[str] = None):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
        if not project:
            raise ValueError("wandb project must be a non-empty string")
        self._wandb = _import_wandb()
        if dir:
            os.makedirs(dir, exist_ok=True)
        kwargs = dict(project=project, entity=entity or None, name=name or None, config=dict(config or {}),
                      dir=dir or None, mode=mode, tags=list(tags) if tags else None)
        if resume_id:  # a resumed training run continues its W&B run
            kwargs.update(id=resume_id, resume="allow")
        self.run = self._wandb.init(**kwargs)
        self.closed = False

    @property
    def run_id(self) -> Optional[str]:
        return getattr(self.run, "id", None)

    def log(self, record: Mapping[str, Any], step: Optional[int] = None) -> Dict[str, float]:
        """Forward the finite numeric entries of ``record`` (bools and strings are left out); returns
        what was sent."""
        if self.closed:
            raise RuntimeError("WandbLogger.log after close()")
        step = record.get("step", step)
        data = {}
        for k, v in record.items():
            if k in _NOT_METRICS or isinstance(v, bool):
                continue
            if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
                v = v.item()
            if isinstance(v, (int, float)) and math.isfinite(v):
                data[k] = v
        if data:
            self.run.log(data, step=int(step) if step is not None else None)
        return data

    def close(self) -> None:
        if not self.closed:
            self.run.finish()
            self.closed = True


class RunLog:
    """Rank 0's record of a run: ``metrics.jsonl`` and TensorBoard scalars (other ranks: no-ops)."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool, purge_step: Optional[int] = None):
        """``purge_step``: resuming from that step; later records of the killed run are dropped
        from metrics.jsonl and TensorBoard (the resumed run logs them again)."""
        self.history: List[Dict[str, Any]] = []
        path = os.path.join(out_dir, "metrics.jsonl")
        if enabled and purge_step is not None:
            truncate_metrics(path, purge_step)
        self.file = open(path, "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"),
                                        purge_step=None if purge_step is None else purge_step + 1)
            except Exception as e:  # tensorboard missing or broken: keep training
                warnings.warn(f"TensorBoard logging disabled ({type(e).__name__}: {e})")

    def __call__(self, record: Dict[str, Any], step: int) -> None:
        if self.file is None:
            return
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        self.history.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record.get("step", step))

    def close(self) -> None:
        for sink in (self.file, self.tb):
            if sink is not None:
                sink.close()
        self.file = self.tb = None
