"""``python -m fastmask.eval``: k-NN and linear-probe accuracy of a frozen backbone.

    python -m fastmask.eval runs/dino/checkpoint.pt --data builtin:shapes --out eval.json
    python -m fastmask.eval vit_s16_dino.pth --which teacher --data /data/imagenet --features cls+avgpool

The backbone (a driver checkpoint's teacher or student, default the network the method evaluates,
or any timm/DeiT/DINO/iBOT file) runs frozen over the ``eval`` pipeline (resize + centre crop) of
the train and val splits, once.  On those features:

* k-NN (DINO's ``eval_knn``): weighted vote of the k nearest L2-normalised CLS features, weights
  exp(cos / T), k = 20, T = 0.07.
* linear probe (DINO's ``eval_linear``): a linear classifier on the CLS token of the last
  ``--n-last-blocks`` blocks (each through the final norm), concatenated with the average-pooled
  patch tokens of the last block for ``--features cls+avgpool``; SGD (momentum 0.9, no weight decay,
  cosine schedule, lr scaled by batch / 256) for every lr of a small sweep, and the best lr by val
  top-1 is reported, as DINO does.  The features are computed once without augmentation (DINO trains
  its probe on random-resized crops): a fast probe, a little optimistic on small data.

Writes ``--out`` (JSON: every lr's accuracy, the best, k-NN, what was evaluated) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._cli import add_checkpoint_arguments, as_usage_errors, run

__all__ = ["FEATURES", "extract", "knn_accuracy", "linear_probe", "evaluate_backbone", "main"]

FEATURES = ("cls", "cls+avgpool")
DEFAULT_LRS = (0.001, 0.01, 0.1, 1.0)


@torch.no_grad()
def backbone_features(model: nn.Module, images: torch.Tensor, *, n_last_blocks: int = 1,
                      avgpool: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(probe features [B, n*D (+D)], k-NN feature [B, D] = the last CLS) of a MaskedViT."""
    if n_last_blocks == 1:
        feats = model.forward_features(images)
        cls_list, last_patch = [feats.cls], feats.patch
    else:
        depth = len(model.blocks)
        if not 1 <= n_last_blocks <= depth:
            raise ValueError(f"n_last_blocks must be in [1, {depth}] (the model's blocks), got {n_last_blocks}")
        x = model.embed(images)
        cls_list = []
        for i, blk in enumerate(model.blocks):
            x = blk(x)
            if i >= depth - n_last_blocks:
                normed = model.norm(x)
                cls_list.append(normed[:, 0])
        last_patch = normed[:, model.num_prefix_tokens:]
    probe = torch.cat(cls_list + ([last_patch.mean(dim=1)] if avgpool else []), dim=-1)
    return probe.float(), cls_list[-1].float()


@torch.no_grad()
def extract(model: nn.Module, loader, device: torch.device, *, n_last_blocks: int = 1, avgpool: bool = False,
            amp_dtype: Optional[torch.dtype] = None, limit: int = 0):
    """(probe features, k-NN features, labels) of a whole eval loader."""
    probe, knn, labels, n = [], [], [], 0
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            p, k = backbone_features(model, images, n_last_blocks=n_last_blocks, avgpool=avgpool)
        probe.append(p)
        knn.append(k)
        labels.append(torch.as_tensor(target).to(device))
        n += images.shape[0]
        if limit and n >= limit:
            break
    probe, knn, labels = torch.cat(probe), torch.cat(knn), torch.cat(labels).long()
    if limit:
        probe, knn, labels = probe[:limit], knn[:limit], labels[:limit]
    return probe, knn, labels


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, val_feats, val_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 256) -> Dict[str, float]:
    """Weighted k-NN top-1 (and top-5 with >= 5 classes), in %, on L2-normalised features
    (normalised here)."""
    from .engine.evaluation import knn_accuracy as _knn

    return _knn(F.normalize(train_feats, dim=-1), train_labels, F.normalize(val_feats, dim=-1), val_labels,
                num_classes, k=k, temperature=temperature, chunk=chunk)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, *, lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 100, batch_size: int = 256,
                 seed: int = 0) -> Dict[str, Any]:
    """Train one linear classifier per lr on fixed features; ``{"per_lr": {lr: top1}, "best_lr",
    "top1", "top5"}`` (val accuracy in %)."""
    if train_x.shape[0] == 0 or val_x.shape[0] == 0:
        raise ValueError("the linear probe needs non-empty train and val features")
    if epochs < 1 or not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"linear probe needs epochs >= 1 and positive lrs, got epochs={epochs}, lrs={list(lrs)}")
    device = train_x.device
    n, dim = train_x.shape
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    per_lr, best = {}, None
    for lr in lrs:
        g = torch.Generator(device="cpu").manual_seed(seed)
        head = nn.Linear(dim, num_classes).to(device)
        with torch.no_grad():  # DINO's LinearClassifier init
            head.weight.normal_(0.0, 0.01, generator=g)
            head.bias.zero_()
        base_lr = lr * batch_size / 256.0
        opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0)
        with torch.enable_grad():  # callable from no-grad evaluation code (the driver's evaluate)
            _train_head(head, opt, train_x, train_y, epochs, batch_size, base_lr, total, g)
        with torch.no_grad():
            logits = head(val_x)
            top1 = 100.0 * (logits.argmax(1) == val_y).float().mean().item()
            top5 = (100.0 * (logits.topk(min(5, num_classes), 1).indices == val_y[:, None]).any(1).float().mean().item()
                    if num_classes >= 5 else None)
        per_lr[lr] = top1
        if best is None or top1 > best[1]:
            best = (lr, top1, top5)
    out = {"per_lr": {str(k): v for k, v in per_lr.items()}, "best_lr": best[0], "top1": best[1]}
    if best[2] is not None:
        out["top5"] = best[2]
    return out


def _train_head(head, opt, train_x, train_y, epochs, batch_size, base_lr, total, g) -> None:
    """SGD over shuffled mini-batches with a cosine lr from ``base_lr`` to 0 over ``total`` steps."""
    n = train_x.shape[0]
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(train_x.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


def _loaders(data: str, image_size: int, batch_size: int, num_workers: int, device: torch.device, loader: str):
    from .data import DataConfig, make_loader

    cfg = DataConfig(data=data, loader=loader, batch_size=batch_size, num_workers=num_workers, image_size=image_size)
    return (make_loader(cfg, "train", "eval", device=device), make_loader(cfg, "val", "eval", device=device))


def evaluate_backbone(model: nn.Module, data: str, *, image_size: int, features: str = "cls", n_last_blocks: int = 1,
                      knn_k: int = 20, knn_temperature: float = 0.07, lrs: Sequence[float] = DEFAULT_LRS,
                      epochs: int = 100, batch_size: int = 64, num_workers: int = 2, loader: str = "auto",
                      device: Optional[torch.device] = None, max_train: int = 0, linear: bool = True,
                      knn: bool = True) -> Dict[str, Any]:
    """k-NN and linear-probe accuracy of ``model`` (frozen) on ``data``; see the module docstring."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    train_loader, val_loader = _loaders(data, image_size, batch_size, num_workers, device, loader)
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    t0 = time.perf_counter()
    kw = dict(n_last_blocks=n_last_blocks, avgpool=features == "cls+avgpool", amp_dtype=amp)
    tr_p, tr_k, tr_y = extract(model, train_loader, device, limit=max_train, **kw)
    va_p, va_k, va_y = extract(model, val_loader, device, **kw)
    num_classes = int(train_loader.num_classes)
    result: Dict[str, Any] = dict(
        data=data, image_size=image_size, features=features, n_last_blocks=n_last_blocks,
        train_images=int(tr_y.numel()), val_images=int(va_y.numel()), num_classes=num_classes,
        chance=100.0 / num_classes, feature_dim=int(tr_p.shape[1]), extract_s=round(time.perf_counter() - t0, 2),
    )
    if knn:
        result["knn"] = dict(k=knn_k, temperature=knn_temperature,
                             **knn_accuracy(tr_k, tr_y, va_k, va_y, num_classes, k=knn_k, temperature=knn_temperature))
    if linear:
        t1 = time.perf_counter()
        result["linear"] = dict(epochs=epochs, **linear_probe(tr_p, tr_y, va_p, va_y, num_classes, lrs=lrs, epochs=epochs))
        result["linear"]["train_s"] = round(time.perf_counter() - t1, 2)
    return result


def format_table(result: Dict[str, Any]) -> str:
    rows = [("metric", "top-1 %", "top-5 %", "notes")]
    if "knn" in result:
        k = result["knn"]
        rows.append((f"k-NN (k={k['k']}, T={k['temperature']})", f"{k['knn_top1']:.1f}",
                     f"{k['knn_top5']:.1f}" if "knn_top5" in k else "-", "last CLS, cosine"))
    if "linear" in result:
        lin = result["linear"]
        rows.append((f"linear ({result['features']}, {result['n_last_blocks']} block(s))", f"{lin['top1']:.1f}",
                     f"{lin['top5']:.1f}" if "top5" in lin else "-", f"best lr {lin['best_lr']:g} of {len(lin['per_lr'])}"))
        for lr, acc in lin["per_lr"].items():
            rows.append((f"  lr {float(lr):g}", f"{acc:.1f}", "", ""))
    rows.append(("chance", f"{result['chance']:.1f}", "", f"{result['num_classes']} classes, "
                 f"{result['train_images']} train / {result['val_images']} val images"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmask.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_arguments(p)
    p.add_argument("--data", default=None, help="builtin:shapes, builtin:digits or an ImageFolder root "
                                                "(default: the run's data)")
    p.add_argument("--image-size", type=int, default=None, help="eval crop (default: the run's, else the model's)")
    p.add_argument("--features", default="cls", choices=FEATURES)
    p.add_argument("--n-last-blocks", type=int, default=1, help="CLS tokens of this many last blocks (DINO: 4 for ViT-S)")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.07)
    p.add_argument("--lrs", type=_floats, default=list(DEFAULT_LRS), help="linear-probe lr sweep (per 256 images)")
    p.add_argument("--epochs", type=int, default=100, help="linear-probe epochs over the fixed features")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--loader", default="auto", choices=("auto", "torch", "dali"))
    p.add_argument("--max-train", type=int, default=0, help="cap on train images (0 = all)")
    p.add_argument("--no-knn", action="store_true")
    p.add_argument("--no-linear", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="JSON output path")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .analysis.loading import backbone_from_args

    with as_usage_errors():  # fastmask._cli.run: one line, exit status 2
        model, info, data, image_size = backbone_from_args(args)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        result = evaluate_backbone(
            model, data, image_size=image_size, features=args.features, n_last_blocks=args.n_last_blocks,
            knn_k=args.knn_k, knn_temperature=args.knn_temperature, lrs=args.lrs, epochs=args.epochs,
            batch_size=args.batch_size, num_workers=args.num_workers, loader=args.loader, device=device,
            max_train=args.max_train, linear=not args.no_linear, knn=not args.no_knn)
    result["checkpoint"] = {k: info.get(k) for k in ("checkpoint", "format", "which", "arch")}
    print(f"{info.get('which')} of {info.get('format')}: {args.checkpoint}")
    print(format_table(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    """The command line; a user mistake is one line ``fastmask.eval: ...`` and exit status 2."""
    return run("fastmask.eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
