"""``python -m fastmask.analyze``: what the layers of one or more ViTs do, side by side.

    python -m fastmask.analyze --checkpoint runs/maskdistill/checkpoint.pt \\
        --checkpoint runs/maskdistill/checkpoint.pt#teacher. --data builtin:shapes --out analysis/

Measures (per layer; see ``fastmask.analysis``): average attention distance (pixels), attention
entropy per head, normalised mutual information of attention, token- and image-level relative log
singular-value spectra, Fourier relative log amplitude, top Hessian eigenvalues and trace, and the
2-D loss landscape along the top-2 Hessian eigenvectors.  Writes ``OUT/analysis.json`` (every
number) and one PNG per measure.

Attention statistics use the full attention matrix, recomputed in float32 from each layer's q and
k (the fused kernels never build it).  Hessian-vector products need double backward, which the
fused / flash attention paths do not have: the curvature measures run the explicit-math attention
path (``fastmask.analysis.math_attention``).  The Hessian is that of a cross-entropy loss on the
analysed images: by default a linear probe fitted on the frozen pooled features (self-supervised
checkpoints have no trained classifier), ``--hessian-loss head`` for the model's own classifier.

A checkpoint is a driver checkpoint (``python -m fastmask.train``; ``PATH#PREFIX`` picks a sub-module
such as ``#teacher.``, default: the student backbone) or a timm-style state dict; the architecture
is read off the weights (``--arch``/``--model-arg`` override it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import yaml

from ._cli import UsageError, run
from .analysis import ALL_MEASURES, AnalysisConfig, analyze_models
from .analysis.loading import load_vit_for_analysis
from .analysis.plots import plot_all

PROG = "fastmask.analyze"

# What each --measures name computes (shown in --help).
MEASURE_HELP = {
    "attention": "average attention distance (pixels), attention entropy per head, normalised mutual "
                 "information (NMI) of attention, per layer",
    "spectrum": "token- and image-level relative log singular-value spectra of the features",
    "fourier": "relative log amplitude of the features' Fourier transform (high vs low frequency)",
    "hessian": "top Hessian eigenvalues (power iteration) and trace (Hutchinson) of the probe loss",
    "landscape": "2-D loss landscape along the top-2 Hessian eigenvectors",
}


def _parse_model_args(items: List[str]) -> Dict[str, object]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--model-arg {item!r} must look like key=value (e.g. num_heads=3)")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _label(path: str, prefix: Optional[str], taken: set) -> str:
    base = os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.basename(path) == "checkpoint.pt" \
        else os.path.splitext(os.path.basename(path))[0]
    label = base + (f"[{prefix.rstrip('.')}]" if prefix else "")
    n, out = 2, label
    while out in taken:
        out, n = f"{label}-{n}", n + 1
    taken.add(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    measures = "\n".join(f"  {name:<10} {MEASURE_HELP[name]}" for name in ALL_MEASURES)
    p = argparse.ArgumentParser(
        prog="python -m fastmask.analyze", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="What the layers of one or more ViTs do, side by side (the Masked-Distillation "
                    "analysis toolkit). Writes OUT/analysis.json and one PNG per measure.",
        epilog=f"measures (--measures, comma-separated; default: all):\n{measures}\n\n"
               "example:\n  python -m fastmask.analyze --checkpoint runs/md/checkpoint.pt "
               "--checkpoint 'runs/md/checkpoint.pt#teacher.' --data builtin:shapes --out analysis/\n"
               "A checkpoint is a driver checkpoint (PATH#PREFIX picks a sub-module, default the student "
               "backbone) or a timm-style state dict.")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="PATH or PATH#PREFIX (repeat to compare models side by side)")
    p.add_argument("--label", action="append", default=None, help="display name per checkpoint (in order)")
    p.add_argument("--data", default="builtin:shapes", help="builtin:shapes, builtin:digits or an ImageFolder root")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=4, help="batches for the attention/feature statistics")
    p.add_argument("--hessian-batches", type=int, default=1, help="batches (of those) defining the loss for curvature")
    p.add_argument("--hessian-loss", default="probe", choices=("probe", "head"))
    p.add_argument("--measures", default=",".join(ALL_MEASURES),
                   help=f"comma-separated subset of {','.join(ALL_MEASURES)}")
    p.add_argument("--top-k", type=int, default=2, help="Hessian eigenvalues to find")
    p.add_argument("--power-iters", type=int, default=30)
    p.add_argument("--trace-samples", type=int, default=20)
    p.add_argument("--landscape-steps", type=int, default=11)
    p.add_argument("--landscape-radius", type=float, default=1.0)
    p.add_argument("--arch", default=None, help="architecture instead of inference: a preset (vit_small) or any timm ViT/DeiT name (vit_small_patch14_dinov2)")
    p.add_argument("--model-arg", action="append", default=[], help="architecture override key=value (repeat)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="~/.cache/fastmask")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder (analysis.json + PNGs)")
    return p


def _load_batches(args, img_size: int, device) -> list:
    from .data import DataConfig, make_loader

    cfg = DataConfig(data=args.data, loader="torch", batch_size=args.batch_size, num_workers=0,
                     image_size=img_size, cache_dir=args.cache_dir)
    loader = make_loader(cfg, split=args.split, pipeline="eval", seed=args.seed, device=device,
                         shuffle=True, drop_last=False)
    batches = []
    for images, labels in loader:
        batches.append((images.float(), labels))
        if len(batches) >= args.max_batches:
            break
    if not batches:
        raise UsageError(f"no images in {args.data} ({args.split})")
    return batches


def _check_args(args) -> tuple:
    """Every check that needs no model or data, before anything is loaded or written."""
    for name in ("max_batches", "batch_size", "hessian_batches", "top_k", "power_iters", "trace_samples",
                 "landscape_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    measures = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    unknown = [m for m in measures if m not in ALL_MEASURES]
    if unknown or not measures:
        raise UsageError(f"unknown measure(s) {', '.join(unknown) or '(none given)'} in --measures; "
                         f"choose from {','.join(ALL_MEASURES)} (see --help)")
    if args.label is not None and len(args.label) != len(args.checkpoint):
        raise UsageError(f"--label given {len(args.label)} times for {len(args.checkpoint)} checkpoints")
    for spec in args.checkpoint:
        path = spec.partition("#")[0]
        if not os.path.isfile(path):
            raise UsageError(f"checkpoint {path!r} does not exist" if not os.path.exists(path)
                             else f"checkpoint {path!r} is not a file")
    if not args.data.startswith("builtin:") and not os.path.isdir(os.path.expanduser(args.data)):
        raise UsageError(f"--data {args.data!r} is neither builtin:NAME nor an existing ImageFolder directory")
    if args.data.startswith("builtin:"):
        from .data.builtin import BUILTIN_DATASETS

        if args.data.split(":", 1)[1] not in BUILTIN_DATASETS:
            raise UsageError(f"unknown built-in dataset {args.data!r}; choose one of "
                             f"{', '.join('builtin:' + n for n in BUILTIN_DATASETS)}")
    if args.device not in ("auto", "cpu") and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} was asked for but no CUDA device is visible; use --device cpu")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    return measures


def _load_checkpoint(spec: str, args, num_heads, model_kwargs):
    path, _, prefix = spec.partition("#")
    try:
        return path, prefix, load_vit_for_analysis(path, prefix=prefix or None, arch=args.arch, num_heads=num_heads,
                                                   model_kwargs=model_kwargs)
    except (ValueError, KeyError, RuntimeError, EOFError, OSError) as e:
        # The loader's messages name the problem; a torch zip-reader error or an empty file does not.
        msg = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        if path not in msg:
            msg = f"cannot load checkpoint {path}: {msg}"
        hint = f" (prefix {prefix!r}: check the key names with torch.load)" if prefix else ""
        raise UsageError(f"{msg}{hint}") from e


def _main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    measures = _check_args(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    model_kwargs = _parse_model_args(args.model_arg)
    num_heads = model_kwargs.pop("num_heads", None)

    models, infos, taken = {}, {}, set()
    for i, spec in enumerate(args.checkpoint):
        path, prefix, (model, info) = _load_checkpoint(spec, args, num_heads, model_kwargs)
        name = args.label[i] if args.label else _label(path, prefix or None, taken)
        models[name] = model.to(device).float()
        infos[name] = info
        print(f"[analyze] {name}: {info['format']}, prefix {info['prefix']!r}, depth {info.get('depth')}, "
              f"width {info.get('embed_dim')}, heads {info['num_heads']}, {info['img_size']} px / patch {info['patch_size']}")
    img_sizes = {int(info["img_size"]) for info in infos.values()}
    img_size = args.img_size or (img_sizes.pop() if len(img_sizes) == 1 else None)
    if img_size is None:
        raise UsageError(f"the models expect different resolutions {sorted(img_sizes)}; pass --img-size")
    batches = _load_batches(args, img_size, device)

    cfg = AnalysisConfig(measures=measures, hessian_batches=args.hessian_batches, hessian_loss=args.hessian_loss,
                         top_k=args.top_k, power_iters=args.power_iters, trace_samples=args.trace_samples,
                         landscape_steps=args.landscape_steps, landscape_radius=args.landscape_radius,
                         seed=args.seed, progress=not args.no_progress)
    if any(m in measures for m in ("hessian", "landscape")):
        print("[analyze] curvature measures use the explicit-math attention path (double backward)")
    t0 = time.time()
    results = analyze_models(models, batches, cfg)
    for name, info in infos.items():
        results["models"][name]["source"] = info
    results["data"] = {"data": args.data, "split": args.split, "batch_size": args.batch_size,
                       "batches": len(batches), "images": sum(b[0].shape[0] for b in batches), "img_size": img_size}
    results["device"] = str(device)
    results["seconds"] = round(time.time() - t0, 2)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "analysis.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    figures = plot_all(results, args.out)
    print(f"[analyze] wrote {json_path} and {len(figures)} figures: {', '.join(os.path.basename(p) for p in figures)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
