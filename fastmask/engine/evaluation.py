"""Evaluation of a run: weighted k-NN accuracy of the evaluated backbone's CLS features (DINO
protocol) and a PNG grid of its last-layer CLS attention on validation images."""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .data import make_loader, split_batch

__all__ = ["evaluate", "extract_features", "knn_accuracy", "save_attention_maps"]


@torch.no_grad()
def evaluate(cfg, method, *, device, amp_dtype, num_classes: int, out_dir: str, epoch: int,
             write_images: bool = True) -> Dict[str, float]:
    """k-NN accuracy on the val split (features of the train split as memory), the method's own
    validation metrics (supervised top-1/top-5) and attention maps.  Runs on rank 0 (the loaders read
    the whole splits), and on every rank with ``write_images`` False on the others when the networks
    are sharded (FSDP: every forward needs every rank)."""
    backbone = method.eval_backbone()
    was_training = backbone.training
    backbone.eval()
    t0 = time.perf_counter()
    train_eval = make_loader(cfg, "train", "eval", shard_id=0, num_shards=1, device=device)
    val_eval = make_loader(cfg, "val", "eval", shard_id=0, num_shards=1, device=device)
    tr_f, tr_y = extract_features(backbone, train_eval, device, amp_dtype, cfg.knn_max_train)
    va_f, va_y = extract_features(backbone, val_eval, device, amp_dtype)
    result = knn_accuracy(tr_f, tr_y, va_f, va_y, num_classes, cfg.knn_k, cfg.knn_temperature)
    result.update(method.evaluate_classifier(val_eval, device, amp_dtype))
    if getattr(cfg, "linear_probe_epochs", 0) > 0:  # online linear probe on the same frozen features
        from ..eval import linear_probe

        probe = linear_probe(tr_f, tr_y, va_f, va_y, num_classes, epochs=cfg.linear_probe_epochs)
        result.update(linear_top1=probe["top1"], linear_best_lr=probe["best_lr"])
    result["eval_seconds"] = time.perf_counter() - t0
    if cfg.attn_images > 0:
        images = pick_images(val_eval, cfg.attn_images).to(device)
        if write_images:
            path = save_attention_maps(backbone, images, os.path.join(out_dir, "attention", f"epoch{epoch + 1:04d}.png"),
                                       amp_dtype)
            if path:
                print(f"[fastmask] attention maps: {path}")
        else:  # a sharded backbone: this rank takes part in rank 0's forward, writes nothing
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                backbone.forward_features(images, return_cls_attn=True)
    backbone.train(was_training)
    return result


@torch.no_grad()
def extract_features(backbone, loader, device, amp_dtype=None, limit: int = 0):
    """L2-normalised CLS features and labels of a whole (eval) loader."""
    feats, labels, n = [], [], 0
    for batch in loader:
        images, target = split_batch(batch)
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = backbone.forward_features(images)
        cls = getattr(out, "cls", out)
        feats.append(F.normalize(cls.float(), dim=-1))
        labels.append(torch.as_tensor(target).to(device))
        n += images.shape[0]
        if limit and n >= limit:
            break
    feats, labels = torch.cat(feats), torch.cat(labels).long()
    if limit:
        feats, labels = feats[:limit], labels[:limit]
    return feats, labels


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, val_feats, val_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 256) -> Dict[str, float]:
    """Weighted k-NN (DINO protocol): votes exp(cos/T) of the k nearest train features.

    Features must be L2-normalised.  Returns top-1 (and top-5 when there are >= 5 classes) in %.
    """
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError("k-NN needs non-empty train and val features")
    k = min(k, train_feats.shape[0])
    top1 = top5 = 0
    for start in range(0, val_feats.shape[0], chunk):
        q = val_feats[start:start + chunk]
        y = val_labels[start:start + chunk]
        sim = q @ train_feats.T
        w, idx = sim.topk(k, dim=1)
        neighbours = train_labels[idx]  # [b, k]
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, neighbours, (w / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        top1 += (ranked[:, 0] == y).sum().item()
        if num_classes >= 5:
            top5 += (ranked[:, :5] == y[:, None]).any(dim=1).sum().item()
    n = val_feats.shape[0]
    out = {"knn_top1": 100.0 * top1 / n}
    if num_classes >= 5:
        out["knn_top5"] = 100.0 * top5 / n
    return out


def pick_images(loader, n: int) -> torch.Tensor:
    """Up to ``n`` validation images of different classes where possible (the eval loader is in
    folder order, so its first batch would often be one class)."""
    chosen, seen, spare = [], set(), []
    for batch in loader:
        images, labels = split_batch(batch)
        for img, y in zip(images, torch.as_tensor(labels).tolist()):
            if y not in seen:
                seen.add(y)
                chosen.append(img)
            elif len(spare) < n:
                spare.append(img)
            if len(chosen) >= n:
                return torch.stack(chosen)
    chosen += spare[: n - len(chosen)]
    return torch.stack(chosen)


def attention_figure(plt, imgs, maps):
    """Images (top row) and their CLS attention overlaid (bottom row) on one shared colour scale,
    with a colour bar: the maps of different images and epochs are comparable."""
    b = len(imgs)
    fig, axes = plt.subplots(2, b, figsize=(2.2 * b + 0.8, 4.4), squeeze=False, layout="constrained")
    vmax = float(max(m.max() for m in maps)) or 1.0
    for i in range(b):
        axes[0, i].imshow(imgs[i])
        axes[1, i].imshow(imgs[i])
        overlay = axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.6, vmin=0.0, vmax=vmax)
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    axes[0, 0].set_title("image", fontsize=8, loc="left")
    axes[1, 0].set_title("last-layer CLS attention", fontsize=8, loc="left")
    bar = fig.colorbar(overlay, ax=axes[1, :].tolist(), shrink=0.9)
    bar.set_label("attention weight (head mean)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return fig


@torch.no_grad()
def save_attention_maps(backbone, images: torch.Tensor, path: str, amp_dtype=None) -> Optional[str]:
    """A PNG grid: each validation image beside it with its last-layer CLS attention overlaid."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: attention-map images are not written")
        return None
    device = images.device
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = backbone.forward_features(images, return_cls_attn=True)
    attn = out.cls_attn.float()
    b, n = attn.shape
    gh = int(round(math.sqrt(n)))
    grid = getattr(backbone, "grid_size", None)
    if grid is not None:
        gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    else:
        gw = n // gh
    maps = attn.reshape(b, 1, gh, gw)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")[:, 0].cpu().numpy()
    imgs = images.float().cpu()
    lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
    hi = imgs.amax(dim=(1, 2, 3), keepdim=True)
    imgs = ((imgs - lo) / (hi - lo).clamp_min(1e-6)).permute(0, 2, 3, 1).numpy()
    fig = attention_figure(plt, imgs, maps)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
