"""``python -m fastmask.train``: the command line of the training engine (``fastmask.engine``).

    python -m fastmask.train                                  # DINO + student-global masking on builtin:shapes
    python -m fastmask.train --method ibot --config ibot_tiny_builtin
    python -m fastmask.train --config ibot_vits16_attmask_high --data /data/imagenet optim.lr=1e-3
    torchrun --nproc_per_node 8 -m fastmask.train --config ... # DDP (nccl on GPU, gloo on CPU)
    python -m fastmask.train --config ... --resume            # continue output_dir/checkpoint.pt
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import ConfigError, load_config
from .engine.evaluation import knn_accuracy
from .engine.loop import Trainer, cosine_schedule, step_seed, train
from .methods import method_names

__all__ = ["main", "build_parser", "train", "Trainer", "knn_accuracy", "cosine_schedule", "step_seed"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmask.train",
        description="Train a masked ViT with one of fastmask's methods. With no arguments: DINO with "
                    "random masking of the student's global views on the built-in shapes dataset.",
        epilog="Overrides: dotted key=value pairs, e.g. optim.lr=1e-3 epochs=10 model.arch=vit_small "
               "method.student_mask_ratio=0.3 data.batch_size=64 method.teacher.arch=vit_base",
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
