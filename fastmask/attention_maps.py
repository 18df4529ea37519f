"""``python -m fastmask.attention_maps``: CLS attention of any checkpoint as PNG overlays, and what AttMask hides.

    python -m fastmask.attention_maps runs/dino/checkpoint.pt --images cat.jpg dog.png --out maps/
    python -m fastmask.attention_maps vit_s16_dino.pth --which teacher --data /data/imagenet --num-images 8 \\
        --image-size 480 --threshold 0.6 --out maps/

For each image one PNG (``OUT/attn_<k>_<name>.png``), DINO-style:

* row 1: the image, the head-mean CLS attention of block ``--layer`` (default the last) and every
  head's CLS attention, overlaid on the image (each map scaled to its own maximum, shown in the
  panel title; one colour bar);
* row 2 (``--threshold T``): the smallest set of patches holding a fraction T of each map's mass
  (DINO's ``visualize_attention.py`` thresholding), outlined on the image;
* row 3: the patches each AttMask mode would hide given the head-mean map (``high``: the most
  attended, ``low``: the least, ``hint``: like high with a few of the most attended revealed), at
  ``--mask-ratio``, from ``fastmask.ops.cls_attention_mask`` (the op the iBOT/DINO methods call).

The head-mean map is the model's own fused CLS-map output (``forward_features(...,
return_cls_attn=True)``: no ``[B, H, L, L]`` is built on any backend); the per-head maps are the
query-0 rows alone, recomputed in float32 from the block's q and k (``[B, H, L]``), and their mean
equals the fused map (checked on every call).  ``OUT/attention_maps.json`` lists the files and the
settings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._cli import add_checkpoint_arguments, as_usage_errors, run

__all__ = ["cls_attention_per_head", "keep_top_mass", "attention_and_masks", "render", "main"]

MODES = ("high", "low", "hint")
_HIDDEN_RGB = (0.15, 0.35, 0.95)


def _cls_rows(attn_module: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Query 0's softmax row of every head over the patch keys [B, H, N], float32, from the
    attention module's own qkv projection and q/k norms (no [B, H, L, L])."""
    b, length, _ = x.shape
    heads = attn_module.num_heads
    qkv = attn_module.qkv(x).float().reshape(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0][:, :, :1], qkv[1]
    q, k = attn_module.q_norm(q).float(), attn_module.k_norm(k).float()
    scale = getattr(attn_module, "scale", None)
    scale = scale if isinstance(scale, (int, float)) else q.shape[-1] ** -0.5
    row = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)  # [B, H, 1, L]
    return row[:, :, 0, num_prefix_tokens:]


@torch.no_grad()
def cls_attention_per_head(model: nn.Module, images: torch.Tensor, layer: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(head-mean CLS map [B, N] from the model's fused path, per-head maps [B, H, N]) of block ``layer``."""
    depth = len(model.blocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
        raise ValueError(f"layer must be a block index in [-{depth}, {depth}), got {layer!r}")
    attn = model.blocks[layer % depth].attn
    captured: List[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    try:
        feats = model.forward_features(images, return_cls_attn=True, attn_layer=layer)
    finally:
        handle.remove()
    per_head = _cls_rows(attn, captured[-1], model.num_prefix_tokens)
    mean = feats.cls_attn.float()
    if not torch.allclose(per_head.mean(1), mean, rtol=1e-2, atol=1e-4):
        err = float((per_head.mean(1) - mean).abs().max())
        raise RuntimeError(f"per-head CLS rows do not average to the fused CLS map (max diff {err:.3g})")
    return mean, per_head


def keep_top_mass(maps: torch.Tensor, mass: float) -> torch.Tensor:
    """bool mask of the smallest set of entries (largest first) holding a fraction ``mass`` of each
    row's total: DINO's thresholding (``cumsum`` of the ascending values ``> 1 - mass``)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {mass}")
    vals, idx = maps.sort(dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    keep_sorted = vals.cumsum(dim=-1) > (1.0 - mass)
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


@torch.no_grad()
def attention_and_masks(model: nn.Module, images: torch.Tensor, *, layer: int = -1, mask_ratio: float = 0.5,
                        show_max: float = 0.1, show_ratio: float = 0.05, threshold: Optional[float] = None,
                        seed: int = 0) -> Dict[str, torch.Tensor]:
    """Everything one figure shows, as tensors: ``mean`` [B, N], ``heads`` [B, H, N], ``keep_mean``
    [B, N] / ``keep_heads`` [B, H, N] (with ``threshold``) and ``mask_<mode>`` [B, N] (True = hidden)."""
    from . import ops

    mean, heads = cls_attention_per_head(model, images, layer)
    out = {"mean": mean, "heads": heads}
    if threshold is not None:
        out["keep_mean"] = keep_top_mass(mean, threshold)
        out["keep_heads"] = keep_top_mass(heads, threshold)
    for mode in MODES:
        out[f"mask_{mode}"] = ops.cls_attention_mask(
            mean.contiguous(), mask_ratio, mode=mode, mask_prob=1.0, show_max=show_max,
            show_ratio=show_ratio if mode == "hint" else None, seed=seed)
    return out


def _to_pixels(x: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]):
    import torch.nn.functional as F

    m = x.float().reshape(-1, 1, *grid)
    return F.interpolate(m, size=size, mode="nearest")[:, 0].cpu().numpy()


def _display_image(img: torch.Tensor):
    from .data.augment import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def render(image: torch.Tensor, maps: Dict[str, torch.Tensor], grid: Tuple[int, int], path: str, *,
           title: str = "", layer_name: str = "last block", mask_ratio: float = 0.5) -> str:
    """One PNG for one image (``maps`` holds that image's entries of ``attention_and_masks``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import cm, colors

    size = tuple(image.shape[-2:])
    rgb = _display_image(image)
    heat = [("head mean", maps["mean"])] + [(f"head {h}", maps["heads"][h]) for h in range(maps["heads"].shape[0])]
    ncol = 1 + len(heat)
    rows = 2 + ("keep_mean" in maps)
    fig, axes = plt.subplots(rows, ncol, figsize=(1.9 * ncol + 0.6, 2.05 * rows), squeeze=False)
    cmap = plt.get_cmap("inferno")
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image", fontsize=8)
    for j, (name, m) in enumerate(heat, start=1):
        peak = float(m.max())
        px = _to_pixels(m / max(peak, 1e-30), grid, size)[0]
        axes[0, j].imshow(rgb)
        axes[0, j].imshow(px, cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
        axes[0, j].set_title(f"{name} (max {peak:.3f})", fontsize=7)
    r = 1
    if "keep_mean" in maps:
        keeps = [maps["keep_mean"]] + [maps["keep_heads"][h] for h in range(maps["keep_heads"].shape[0])]
        axes[r, 0].text(0.5, 0.5, f"top {maps['threshold']:.0%}\nof each map's\nmass", ha="center", va="center",
                        fontsize=8, transform=axes[r, 0].transAxes)
        for j, keep in enumerate(keeps, start=1):
            px = _to_pixels(keep, grid, size)[0]
            axes[r, j].imshow(rgb * (0.35 + 0.65 * px[..., None]))
            axes[r, j].contour(px, levels=[0.5], colors=["cyan"], linewidths=0.8)
            axes[r, j].set_title(f"{int(keep.sum())} of {keep.numel()} patches", fontsize=7)
        r += 1
    axes[r, 0].imshow(rgb)
    axes[r, 0].set_title(f"AttMask, ratio {mask_ratio:g}", fontsize=8)
    for j, mode in enumerate(MODES, start=1):
        hidden = _to_pixels(maps[f"mask_{mode}"], grid, size)[0]
        shown = rgb.copy()
        hide = hidden > 0.5  # hidden patches tinted blue (the student sees mask tokens there)
        shown[hide] = 0.3 * shown[hide] + 0.7 * np.asarray(_HIDDEN_RGB)
        axes[r, j].imshow(shown, interpolation="nearest")
        axes[r, j].set_title(f"{mode}: {int(maps[f'mask_{mode}'].sum())} hidden", fontsize=7)
    fig.suptitle(f"{title}  CLS attention, {layer_name}".strip(), fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.9, top=0.86, bottom=0.02, wspace=0.05, hspace=0.3)
    bar = fig.add_axes([0.92, 0.15, 0.015, 0.7])
    fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap=cmap), cax=bar).set_label(
        "attention / the map's max", fontsize=7)
    bar.tick_params(labelsize=6)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _load_images(paths: Sequence[str], image_size: int, crop_pct: float) -> torch.Tensor:
    from .data import augment
    from .data.torch_loader import decode_rgb

    spec = augment.EvalSpec(image_size, crop_pct)
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"image not found: {p!r}")
        try:
            out.append(augment.apply_eval(decode_rgb(p), spec))
        except Exception as e:  # noqa: BLE001 - any decode error, named with the file
            raise ValueError(f"cannot read image {p!r}: {type(e).__name__}: {e}") from e
    return torch.stack(out)


def _dataset_images(data: str, image_size: int, n: int, split: str) -> Tuple[torch.Tensor, List[str]]:
    """``n`` images of different classes where possible, from the eval pipeline of ``split``."""
    from .data import DataConfig, make_loader

    loader = make_loader(DataConfig(data=data, loader="torch", batch_size=64, num_workers=0, image_size=image_size),
                         split, "eval")
    chosen, names, seen, spare = [], [], set(), []
    for images, labels in loader:
        for img, y in zip(images, labels.tolist()):
            if y not in seen and len(chosen) < n:
                seen.add(y)
                chosen.append(img)
                names.append(f"class{y}")
            elif len(spare) < n:
                spare.append((img, f"class{y}"))
        if len(chosen) >= n:
            break
    for img, name in spare[: n - len(chosen)]:
        chosen.append(img)
        names.append(name)
    return torch.stack(chosen), names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmask.attention_maps", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", nargs="+", default=None, help="image files")
    src.add_argument("--data", default=None, help="builtin:shapes, builtin:digits or an ImageFolder root")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--num-images", type=int, default=4, help="images taken from --data (different classes)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the run's / the model's)")
    p.add_argument("--crop-pct", type=float, default=1.0, help="centre crop fraction for --images (1 = whole image)")
    p.add_argument("--layer", type=int, default=-1, help="block whose CLS attention is shown")
    p.add_argument("--threshold", type=float, default=None, help="also show the patches holding this mass (DINO: 0.6)")
    p.add_argument("--mask-ratio", type=float, default=0.5, help="AttMask ratio of hidden patches")
    p.add_argument("--show-max", type=float, default=0.1, help="AttMask-hint: pool of most attended patches")
    p.add_argument("--show-ratio", type=float, default=0.05, help="AttMask-hint: fraction revealed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="attention_maps", help="output folder")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .analysis.loading import backbone_from_args

    with as_usage_errors():  # fastmask._cli.run: one line, exit status 2
        model, info, data, size = backbone_from_args(args)
        if args.images:
            images = _load_images(args.images, size, args.crop_pct)
            names = [os.path.splitext(os.path.basename(p))[0] for p in args.images]
        else:
            images, names = _dataset_images(data, size, args.num_images, args.split)
        model.eval()
        maps = attention_and_masks(model, images, layer=args.layer, mask_ratio=args.mask_ratio,
                                   show_max=args.show_max, show_ratio=args.show_ratio, threshold=args.threshold,
                                   seed=args.seed)
    grid = tuple(model.grid_for(tuple(images.shape[-2:])))
    layer = args.layer % len(model.blocks)
    files = []
    for i, name in enumerate(names):
        one = {k: v[i] for k, v in maps.items()}
        one["threshold"] = args.threshold
        path = os.path.join(args.out, f"attn_{i:03d}_{name}.png")
        render(images[i], one, grid, path, title=f"{info.get('which')} [{name}]",
               layer_name=f"block {layer}" + (" (last)" if layer == len(model.blocks) - 1 else ""),
               mask_ratio=args.mask_ratio)
        files.append(path)
        print(f"wrote {path}")
    index = dict(checkpoint=info.get("checkpoint"), which=info.get("which"), layer=layer, image_size=size,
                 grid=list(grid), heads=int(maps["heads"].shape[1]), threshold=args.threshold,
                 mask_ratio=args.mask_ratio, files=files)
    with open(os.path.join(args.out, "attention_maps.json"), "w") as f:
        json.dump(index, f, indent=2)
    return 0


def main(argv=None) -> int:
    """The command line; a user mistake is one line ``fastmask.attention_maps: ...`` and exit status 2."""
    return run("fastmask.attention_maps", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
