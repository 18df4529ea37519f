"""A few training steps of each method under the engine, run by tests/test_engine.py and
bench/bench_engine.py: as one process, or under ``torchrun --nproc_per_node 2`` (gloo).

    python tests/engine_worker.py OUT.pt --data FOLDER --cases dino,ibot [--accum 2] [--parallel fsdp]

Every process builds the same global batches from a seeded generator and takes its contiguous
slice (rank r of w: rows [r*B/w, (r+1)*B/w)); one process accumulating w micro-batches takes them
in the same order, so micro-batch m sees what rank m sees and draws the same random numbers
(the engine seeds each slice of the global batch alike).  Rank 0 writes the full state dicts
(``engine.checkpoint.full_state``) and, for DDP, what the reducer did: the number of gradients
ready when each bucket's all-reduce started (fewer than all = overlapped with the backward).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastmask.config import load_config  # noqa: E402
from fastmask.engine import checkpoint as ckpt_io  # noqa: E402
from fastmask.engine import distributed as D  # noqa: E402
from fastmask.engine.loop import Trainer  # noqa: E402

GLOBAL_BATCH = 8
TINY = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=8", "model.img_size=32",
        "model.drop_path_rate=0.0", "data.image_size=32", "data.local_size=16", "data.num_local_crops=2",
        "data.num_workers=0", "data.loader=torch", "epochs=2", "optim.warmup_epochs=0", "log_every=1",
        "eval_every=0", "tensorboard=false", "progress_bar=false", "optim.lr=0.01", "optim.min_lr=0.0",
        "optim.scale_lr_by_batch=false", "seed=3"]
SSL_HEAD = ["method.out_dim=64", "method.head_hidden_dim=32", "method.head_bottleneck_dim=16",
            "method.head_use_bn=false", "method.warmup_teacher_temp_epochs=0"]
NO_MIX = ["method.mixup_alpha=0", "method.cutmix_alpha=0", "method.mixup_prob=0"]
# Recipes and overrides: masks that depend only on the images (AttMask at a fixed ratio on every
# image) where the method allows it, random masks (MaskSub, MaskDistill) otherwise.
CASES = {
    "dino": ("dino_tiny_builtin", SSL_HEAD + ["method.student_mask=attmask_high", "method.attmask_ratio=[0.3,0.3]",
                                              "method.attmask_prob=1.0", "optim.teacher_momentum=0.9"]),
    "ibot": ("ibot_tiny_builtin", SSL_HEAD + ["method.patch_out_dim=64", "method.mask=attmask_high",
                                              "method.mask_ratio=[0.3,0.3]", "method.mask_prob=1.0",
                                              "optim.teacher_momentum=0.9"]),
    # random teachers (checkpoint=none): the recipes' `auto` would first train one
    "maskedkd": ("maskedkd_tiny_builtin", NO_MIX + ["method.teacher.checkpoint=none", "method.teacher.depth=1", "method.teacher.arch=vit_tiny",
                                                    "method.teacher.embed_dim=24", "method.teacher.num_heads=2",
                                                    "method.teacher_keep=0.5"]),
    "masksub": ("masksub_tiny_builtin", NO_MIX + ["method.mask_ratio=0.5"]),
    "maskdistill": ("maskdistill_tiny_builtin", ["method.teacher.checkpoint=none", "method.teacher.depth=1", "method.teacher.embed_dim=24",
                                                 "method.mask_min_patches=2"]),
}


def global_batches(pipeline: str, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
        if pipeline == "multicrop":
            crops = [torch.randn(GLOBAL_BATCH, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
            out.append((crops, labels))
        else:
            out.append((torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), labels))
    return out


def take(batch, start: int, stop: int):
    if isinstance(batch, torch.Tensor):
        return batch[start:stop].contiguous()
    return type(batch)(take(b, start, stop) for b in batch)


class OverlapProbe:
    """A DDP comm hook that records how many gradients were ready when each bucket was sent."""

    def __init__(self, ddp):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.ready, self.events, self.total = 0, [], 0
        for p in ddp.module.parameters():
            if p.requires_grad:
                self.total += 1
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self._allreduce = allreduce_hook
        ddp.register_comm_hook(None, self._hook)

    def _grad_ready(self, _p):
        self.ready += 1

    def _hook(self, state, bucket):
        self.events.append(self.ready)
        return self._allreduce(state, bucket)

    def new_step(self):
        self.ready = 0


def run_case(name: str, args, out_dir: str):
    recipe, extra = CASES[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = GLOBAL_BATCH // world // args.accum
    overrides = TINY + extra + [f"data.data={args.data}", f"data.batch_size={per_rank}",
                                f"optim.accum_steps={args.accum}", f"parallel={args.parallel}",
                                "fsdp_mixed_precision=false", f"ddp_bucket_mb={args.bucket_mb}",
                                f"output_dir={out_dir}", f"data.cache_dir={os.path.join(out_dir, 'cache')}"]
    cfg = load_config(config=recipe, overrides=overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teachers
        trainer = Trainer(cfg)
    probe = OverlapProbe(trainer.ddp) if trainer.ddp is not None else None
    rank = trainer.rank
    losses = []
    for step, batch in enumerate(global_batches(trainer.method_cls.pipeline, args.steps)):
        if args.fail_rank == rank and step == 1:
            raise RuntimeError(f"boom on rank {rank}")
        micro = []
        for m in range(args.accum):
            part = m * world + rank
            size = GLOBAL_BATCH // (world * args.accum)
            micro.append(take(batch, part * size, (part + 1) * size))
        if probe is not None:
            probe.new_step()
        out = trainer.train_step(micro, epoch=0)
        losses.append(float(out["loss"]))
    model_state, _ = ckpt_io.full_state(trainer.method, trainer.optimizer)
    trainer.log_sink.close()
    result = {"state": model_state, "losses": losses}
    if probe is not None:
        result["overlap"] = {"grads": probe.total, "ready_at_bucket": probe.events}
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", required=True)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--bucket-mb", type=float, default=0.05)  # several buckets for the tiny models
    p.add_argument("--fail-rank", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    for name in args.cases.split(","):
        with D.fail_together(rank, world):
            results[name] = run_case(name, args, f"{os.path.abspath(args.out)}.run_{name}")
    info = D.DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), 0,
                      torch.distributed.is_initialized())
    if info.is_main:
        torch.save(results, args.out)
    D.shutdown(info)


if __name__ == "__main__":
    main()
