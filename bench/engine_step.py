"""Times optimizer steps of the engine (``Trainer.train_step``) in 1 or more processes; run by
bench/bench_engine.py, alone or under ``torchrun``:

    python bench/engine_step.py OUT.json --method dino [--steps 8] [--profile TRACE.json]

Weak scaling: every process gets the same per-process batch, so the ideal 2-process step time is
the 1-process one.  With ``--profile`` rank 0 records a CPU profiler trace of two steps and
summarises it: the time the gradient all-reduces (``gloo:all_reduce`` on gloo's worker threads)
ran, and how much of it ran while the autograd engine was still computing gradients on the main
thread (communication hidden under backward).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastmask.config import load_config  # noqa: E402
from fastmask.engine import distributed as D  # noqa: E402
from fastmask.engine.loop import Trainer  # noqa: E402

PER_RANK_BATCH = 16
MODEL = ["model.arch=vit_tiny", "model.depth=6", "model.patch_size=8", "model.img_size=32", "model.drop_path_rate=0.0",
         "data.image_size=32", "data.local_size=16", "data.num_local_crops=2", "data.num_workers=0",
         "data.loader=torch", "tensorboard=false", "progress_bar=false", "eval_every=0", "seed=0"]
METHODS = {
    "dino": ("dino_tiny_builtin", ["method.student_mask=attmask_high", "method.head_use_bn=false"]),
    "masksub": ("masksub_tiny_builtin", ["method.mixup_alpha=0", "method.cutmix_alpha=0"]),
}


def batch_for(pipeline: str, n: int, g: torch.Generator):
    labels = torch.randint(0, 3, (n,), generator=g)
    if pipeline == "multicrop":
        return [torch.randn(n, 3, s, s, generator=g) for s in (32, 32, 16, 16)], labels
    return torch.randn(n, 3, 32, 32, generator=g), labels


def _union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _overlap(a, b) -> float:
    """Total length of the intersection of two interval unions."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def trace_summary(path: str, main_tid) -> dict:
    """Communication time and the part of it concurrent with backward compute, from a chrome trace."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    comm = _union([e["ts"], e["ts"] + e["dur"]] for e in events if e["name"] == "gloo:all_reduce")
    backward = _union([e["ts"], e["ts"] + e["dur"]] for e in events
                      if e["tid"] == main_tid and e["name"].startswith("autograd::engine::evaluate_function"))
    comm_us = sum(b - a for a, b in comm)
    hidden_us = _overlap(comm, backward)
    return {"allreduce_calls": sum(1 for e in events if e["name"] == "gloo:all_reduce"),
            "allreduce_us": round(comm_us, 1), "backward_compute_us": round(sum(b - a for a, b in backward), 1),
            "allreduce_hidden_under_backward_us": round(hidden_us, 1),
            "overlap_fraction": round(hidden_us / comm_us, 4) if comm_us else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--method", default="dino", choices=sorted(METHODS))
    p.add_argument("--data", default="builtin:shapes")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=1.0)
    p.add_argument("--profile", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    recipe, extra = METHODS[args.method]
    out_dir = f"{os.path.abspath(args.out)}.run"
    cfg = load_config(config=recipe, overrides=MODEL + extra + [
        f"data.data={args.data}", f"data.batch_size={PER_RANK_BATCH}", f"output_dir={out_dir}", "overwrite=true",
        f"ddp_bucket_mb={args.bucket_mb}"])
    with D.fail_together(rank, world), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(cfg)
        g = torch.Generator().manual_seed(rank)
        batches = [batch_for(trainer.method_cls.pipeline, PER_RANK_BATCH, g) for _ in range(4)]
        for i in range(args.warmup):
            trainer.train_step([batches[i % 4]], epoch=1)
        times = []
        for i in range(args.steps):
            D.barrier(world)
            t0 = time.perf_counter()
            trainer.train_step([batches[i % 4]], epoch=1)
            times.append(time.perf_counter() - t0)
        summary = None
        if args.profile and world > 1:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(2):
                    trainer.train_step([batches[i % 4]], epoch=1)
            if rank == 0:
                prof.export_chrome_trace(args.profile)
                main_tid = next(e["tid"] for e in json.load(open(args.profile))["traceEvents"]
                                if e.get("name", "").startswith("autograd::engine::evaluate_function"))
                summary = trace_summary(args.profile, main_tid)
        trainer.log_sink.close()
        if rank == 0:
            times.sort()
            with open(args.out, "w") as f:
                json.dump({"method": args.method, "world": world, "per_rank_batch": PER_RANK_BATCH,
                           "global_batch": PER_RANK_BATCH * world, "step_s_median": times[len(times) // 2],
                           "step_s_min": times[0], "steps": len(times), "trace": summary}, f, indent=1)
    D.shutdown(trainer.dist)


if __name__ == "__main__":
    main()
