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

from ._cli import UsageError, run
from .config import load_config
from .engine.evaluation import knn_accuracy
from .engine.loop import Trainer, cosine_schedule, step_seed, train
from .methods import method_names

__all__ = ["main", "build_parser", "train", "Trainer", "knn_accuracy", "cosine_schedule", "step_seed"]


def _recipe_lines():
    """One line per built-in recipe: its name, method and first comment line."""
    import glob
    import os

    from .config import RECIPE_DIR

    lines = []
    for path in sorted(glob.glob(os.path.join(RECIPE_DIR, "*.yaml"))):
        method, about = "?", ""
        with open(path) as f:
            for line in f:
                if line.startswith("#") and not about:
                    about = line.lstrip("# ").strip()
                elif line.startswith("method:"):
                    method = line.split(":", 1)[1].strip()
                    break
        name = os.path.splitext(os.path.basename(path))[0]
        lines.append(f"  {name:34s} {method:12s} {about[:70]}")
    return lines


def _group_lines():
    """The config groups (sections) and their keys, from the dataclasses."""
    import dataclasses
    import textwrap

    from .config import ModelConfig, OptimConfig, TrainConfig
    from .data import DataConfig

    def keys(cls):
        return ", ".join(f.name for f in dataclasses.fields(cls))

    top = ", ".join(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("method_name", "model", "data",
                                                                                        "optim", "method"))
    groups = [("model.", keys(ModelConfig)), ("data.", keys(DataConfig)), ("optim.", keys(OptimConfig)),
              ("method.", "the method's own options (dino.DINOConfig, ibot.IBOTConfig, ...; a frozen teacher "
                          "is method.teacher.*: arch, checkpoint, depth, ...)"),
              ("(top level)", top)]
    out = []
    for name, text in groups:
        out += textwrap.wrap(text, 96, initial_indent=f"  {name:12s} ", subsequent_indent=" " * 15)
    return out


def build_parser() -> argparse.ArgumentParser:
    epilog = "\n".join([
        "overrides: dotted key=value pairs (values parsed as YAML), e.g. optim.lr=1e-3 epochs=10",
        "  model.arch=vit_small method.student_mask_ratio=0.3 data.batch_size=64 method.teacher.arch=vit_base",
        "", "config groups (keys):", *_group_lines(),
        "", "recipes (--config NAME):", *_recipe_lines(),
        "", "errors in the configuration, data, device or checkpoint are one line on stderr, exit status 2",
        "(FASTMASK_DEBUG=1 shows the traceback)",
    ])
    p = argparse.ArgumentParser(
        prog="python -m fastmask.train",
        description="Train a masked ViT with one of fastmask's methods. With no arguments: DINO with "
                    "random masking of the student's global views on the built-in shapes dataset.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=method_names(), default=None, help="training method (default: dino)")
    p.add_argument("--config", default=None,
                   help="YAML recipe: a path or a name under fastmask/recipes (default: dino_tiny_builtin)")
    p.add_argument("--data", default=None, help="dataset: an ImageFolder root or builtin:NAME")
    p.add_argument("--output-dir", default=None, help="where checkpoints and logs go")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the run in output_dir (its checkpoint.pt) or from the given checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds another run (its checkpoints and logs are deleted)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


PROG = "fastmask.train"


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value pairs may come before or after options
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    if args.overwrite:
        if args.resume is not None:
            raise UsageError("--overwrite and --resume contradict each other: pick one")
        overrides.append("overwrite=true")
    cfg = load_config(method=args.method, config=args.config, overrides=overrides, data=args.data)
    summary = train(cfg)
    return 0 if summary is not None else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; a user mistake is one line ``fastmask.train: ...`` and exit status 2."""
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
