"""``method.teacher.checkpoint: auto``: a real teacher for the distillation recipes on built-in data.

The first run trains the teacher once, through this driver (a short supervised MaskSub run of the
teacher's architecture on the run's own data and patch grid), and caches its checkpoint under
``<data.cache_dir>/teachers/<arch, sizes, grid, data, epochs, seed>/``; later runs with the same
settings reuse it.  The log says which teacher was used, how it was trained and its val top-1.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Dict, Optional

__all__ = ["AUTO", "resolve_auto_teacher", "teacher_run_dir", "teacher_overrides"]

AUTO = "auto"
_VERSION = 1  # bump when the teacher's training recipe changes (old cache entries are not reused)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def teacher_overrides(cfg) -> Dict[str, object]:
    """The settings of the teacher's training run (a MaskSub recipe on the run's data)."""
    t, m, d = cfg.method.teacher, cfg.model, cfg.data
    patch = t.patch_size or m.patch_size
    img = (m.img_size // m.patch_size) * patch  # the student's patch grid at the teacher's patch size
    out = {"model.arch": t.arch, "model.patch_size": patch, "model.img_size": img, "data.image_size": img,
           "data.data": d.data, "data.cache_dir": d.cache_dir, "data.loader": d.loader,
           "data.batch_size": min(int(d.batch_size), 64), "data.num_workers": d.num_workers,
           "epochs": int(t.auto_epochs), "seed": int(cfg.seed), "device": cfg.device, "amp": cfg.amp}
    for k in ("depth", "embed_dim", "num_heads"):
        if getattr(t, k):
            out[f"model.{k}"] = getattr(t, k)
    if t.pre_norm or t.act_layer:
        raise ValueError("method.teacher.checkpoint=auto trains plain ViTs; unset method.teacher.pre_norm/act_layer")
    return out


def teacher_run_dir(cfg) -> str:
    settings = teacher_overrides(cfg)
    key = {k: v for k, v in settings.items() if k not in ("data.cache_dir", "data.num_workers", "device")}
    digest = hashlib.sha1(json.dumps([_VERSION, key], sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = _slug(f"{settings['model.arch']}-d{settings.get('model.depth', 0)}-e{settings.get('model.embed_dim', 0)}"
                 f"-p{settings['model.patch_size']}-{settings['model.img_size']}px-{cfg.data.data}"
                 f"-{settings['epochs']}ep-{digest}")
    return os.path.join(os.path.expanduser(cfg.data.cache_dir), "teachers", name)


def _train_teacher(cfg, run_dir: str) -> Dict[str, object]:
    from ..config import load_config
    from .loop import train

    overrides = [f"{k}={v}" for k, v in teacher_overrides(cfg).items()]
    tmp = run_dir + ".partial"
    overrides += [f"output_dir={tmp}", "overwrite=true", "progress_bar=false", "tensorboard=false",
                  "attn_images=0", "eval_every=0", "log_every=50", "max_steps=0", "resume=", "compile=false"]
    teacher_cfg = load_config(config="masksub_tiny_builtin", overrides=overrides)
    summary = train(teacher_cfg)
    with open(os.path.join(tmp, "teacher.json"), "w") as f:
        json.dump({"settings": teacher_overrides(cfg), "summary": summary}, f, indent=1, default=str)
    if os.path.isdir(run_dir):  # a concurrent run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, run_dir)
    return summary


def _describe(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "teacher.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return ""
    s, summ = info.get("settings", {}), info.get("summary", {})
    acc = summ.get("val_top1", summ.get("knn_top1"))
    acc_txt = f", val top-1 {acc:.1f}%" if isinstance(acc, (int, float)) else ""
    return (f"{s.get('model.arch')} ({s.get('model.depth', 'full')} blocks) trained {s.get('epochs')} epochs "
            f"on {s.get('data.data')}{acc_txt}")


def resolve_auto_teacher(cfg, world: int = 1, rank: int = 0) -> Optional[str]:
    """Replace ``method.teacher.checkpoint: auto`` by the cached teacher's checkpoint, training it
    first when it is not cached (rank 0; the other ranks wait).  Returns the path, or None."""
    teacher = getattr(cfg.method, "teacher", None)
    if teacher is None or teacher.checkpoint != AUTO:
        return None
    run_dir = teacher_run_dir(cfg)
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path) and rank == 0:
        print(f"[fastmask] method.teacher.checkpoint=auto: training the teacher once ({teacher.arch}, "
              f"{teacher.auto_epochs} epochs of supervised MaskSub on {cfg.data.data}) -> {run_dir}", flush=True)
        saved = os.environ.get("WORLD_SIZE")
        os.environ["WORLD_SIZE"] = "1"  # the teacher's run is a single process even under torchrun
        try:
            _train_teacher(cfg, run_dir)
        finally:
            if saved is None:
                os.environ.pop("WORLD_SIZE", None)
            else:
                os.environ["WORLD_SIZE"] = saved
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        print(f"[fastmask] teacher: {_describe(run_dir) or 'cached'} -> {path}", flush=True)
    teacher.checkpoint = path
    teacher.checkpoint_key = None  # the driver checkpoint's student (backbone + classifier)
    return path
