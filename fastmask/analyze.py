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

from .analysis import ALL_MEASURES, AnalysisConfig, analyze_models
from .analysis.loading import load_vit_for_analysis
from .analysis.plots import plot_all


def _parse_model_args(items: List[str]) -> Dict[str, object]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--model-arg {item!r} must look like key=value (e.g. num_heads=3)")
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
    p = argparse.ArgumentParser(prog="python -m fastmask.analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
        raise SystemExit(f"no images in {args.data} ({args.split})")
    return batches


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_batches < 1:
        raise SystemExit("--max-batches must be >= 1")
    measures = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    model_kwargs = _parse_model_args(args.model_arg)
    num_heads = model_kwargs.pop("num_heads", None)
    if args.label is not None and len(args.label) != len(args.checkpoint):
        raise SystemExit(f"--label given {len(args.label)} times for {len(args.checkpoint)} checkpoints")

    models, infos, taken = {}, {}, set()
    for i, spec in enumerate(args.checkpoint):
        path, _, prefix = spec.partition("#")
        model, info = load_vit_for_analysis(path, prefix=prefix or None, arch=args.arch, num_heads=num_heads,
                                            model_kwargs=model_kwargs)
        name = args.label[i] if args.label else _label(path, prefix or None, taken)
        models[name] = model.to(device).float()
        infos[name] = info
        print(f"[analyze] {name}: {info['format']}, prefix {info['prefix']!r}, depth {info.get('depth')}, "
              f"width {info.get('embed_dim')}, heads {info['num_heads']}, {info['img_size']} px / patch {info['patch_size']}")
    img_sizes = {int(info["img_size"]) for info in infos.values()}
    img_size = args.img_size or (img_sizes.pop() if len(img_sizes) == 1 else None)
    if img_size is None:
        raise SystemExit(f"the models expect different resolutions {sorted(img_sizes)}; pass --img-size")
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


if __name__ == "__main__":
    sys.exit(main())
