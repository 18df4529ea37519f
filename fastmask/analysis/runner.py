"""Run every analysis measure on one or more ViTs over a few batches and collect the numbers.

``analyze_models({name: model}, batches)`` returns a plain dict (JSON-ready: lists and floats)
keyed by model name; ``fastmask.analysis.plots`` turns it into figures and ``fastmask.analyze``
is the command line around both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .attention import attention_distance, attention_entropy, attention_nmi
from .capture import LayerRecorder, find_blocks, math_attention
from .features import fourier_amplitude, image_spectrum, relative_log_amplitude_profile, token_spectrum
from .hessian import hutchinson_trace, loss_landscape_2d, top_eigenvalues

__all__ = ["AnalysisConfig", "ALL_MEASURES", "vit_geometry", "analyze_model", "analyze_models", "pooled_features"]

ALL_MEASURES = ("attention", "spectrum", "fourier", "hessian", "landscape")


@dataclass
class AnalysisConfig:
    measures: Tuple[str, ...] = ALL_MEASURES
    hessian_batches: int = 1  # batches (of those analysed) that define the loss for curvature
    hessian_loss: str = "probe"  # "probe": linear probe fitted on frozen features; "head": the model's own head
    top_k: int = 2  # Hessian eigenvalues (the landscape needs 2)
    power_iters: int = 30
    power_tol: float = 1e-3
    trace_samples: int = 20
    landscape_steps: int = 11
    landscape_radius: float = 1.0
    probe_steps: int = 100
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        unknown = set(self.measures) - set(ALL_MEASURES)
        if unknown:
            raise ValueError(f"unknown measures {sorted(unknown)}; known: {', '.join(ALL_MEASURES)}")
        if self.hessian_loss not in ("probe", "head"):
            raise ValueError(f"hessian_loss must be 'probe' or 'head', got {self.hessian_loss!r}")
        if "landscape" in self.measures and self.top_k < 2:
            raise ValueError("the loss landscape needs top_k >= 2 Hessian eigenvectors")


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def vit_geometry(model: nn.Module) -> Dict[str, object]:
    """Patch size (pixels), token grid and number of prefix tokens of a timm-style ViT."""
    pe = getattr(model, "patch_embed", None)
    patch = getattr(model, "patch_size", None) or getattr(pe, "patch_size", None)
    grid = getattr(model, "grid_size", None) or getattr(pe, "grid_size", None)
    if patch is None or grid is None:
        raise ValueError(f"cannot read patch_size / grid_size from {type(model).__name__}")
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = 1 if getattr(model, "cls_token", None) is not None else 0
    ph, pw = _pair(patch)
    if ph != pw:
        raise ValueError(f"non-square patches {ph}x{pw} are not supported")
    blocks = find_blocks(model)
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None)
    return {"patch_size": ph, "grid_size": list(_pair(grid)), "num_prefix_tokens": int(prefix),
            "depth": len(blocks), "num_heads": heads,
            "embed_dim": int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))}


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """One vector per image: the CLS (or pooled) output of ``forward_features``."""
    out = model.forward_features(images)
    cls = getattr(out, "cls", None)
    if isinstance(cls, torch.Tensor):
        return cls
    if isinstance(out, torch.Tensor) and out.dim() == 3:
        if hasattr(model, "forward_head"):
            return model.forward_head(out, pre_logits=True)
        return out[:, 0]
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return out
    raise TypeError(f"cannot pool the output of {type(model).__name__}.forward_features ({type(out).__name__})")


def _fit_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, seed: int) -> nn.Linear:
    """Multinomial logistic regression on frozen features (L-BFGS, small L2), in float32."""
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Linear(feats.shape[1], num_classes).to(feats.device)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen).to(feats.device) * 0.01)
        probe.bias.zero_()
    mean, std = feats.mean(0, keepdim=True), feats.std(0, keepdim=True).clamp_min(1e-6)
    x = (feats - mean) / std
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), labels) + 1e-2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # Fold the standardisation into the probe so it takes raw features.
    with torch.no_grad():
        w = probe.weight / std
        probe.bias.sub_((w * mean).sum(1))
        probe.weight.copy_(w)
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


class _Accumulator:
    """Per-layer running sums of the attention and feature statistics over batches."""

    def __init__(self, geom, measures):
        self.geom = geom
        self.measures = measures
        self.n_attn = 0
        self.n_feat = 0
        self.attn = {"distance": {}, "entropy": {}, "nmi": {}}
        self.token_spec: Dict[int, torch.Tensor] = {}
        self.image_reps: Dict[int, List[torch.Tensor]] = {}
        self.amp: Dict[int, torch.Tensor] = {}
        self.batch_size = 0

    def on_attention(self, layer, attn):
        b = attn.shape[0]
        g = self.geom
        stats = {
            "distance": attention_distance(attn, g["grid_size"], g["patch_size"], g["num_prefix_tokens"]),
            "entropy": attention_entropy(attn),
            "nmi": attention_nmi(attn),
        }
        for key, per_head in stats.items():
            acc = self.attn[key]
            acc[layer] = acc.get(layer, 0) + per_head.cpu() * b

    def on_features(self, layer, tokens):
        b = tokens.shape[0]
        patches = tokens[:, self.geom["num_prefix_tokens"]:].float()
        if "spectrum" in self.measures:
            self.token_spec[layer] = self.token_spec.get(layer, 0) + token_spectrum(patches).cpu() * b
            self.image_reps.setdefault(layer, []).append(patches.mean(1).double().cpu())
        if "fourier" in self.measures:
            self.amp[layer] = self.amp.get(layer, 0) + fourier_amplitude(patches, self.geom["grid_size"]).cpu() * b

    def results(self, num_images: int) -> Dict[str, object]:
        out: Dict[str, object] = {}
        depth = self.geom["depth"]
        if "attention" in self.measures:
            names = {"distance": "attention_distance", "entropy": "attention_entropy", "nmi": "attention_nmi"}
            for key, name in names.items():
                per_head = [(self.attn[key][i] / num_images).tolist() for i in range(depth)]
                out[name] = {"per_head": per_head, "mean": [sum(h) / len(h) for h in per_head]}
            out["attention_distance"]["unit"] = "pixels"
            out["attention_entropy"]["unit"] = "nats"
        if "spectrum" in self.measures:
            out["token_spectrum"] = {
                "relative_log_sigma": [(self.token_spec[i] / num_images).tolist() for i in range(depth)],
                "note": "per-image SVD of the [N, D] patch-token matrix, log sigma_i - log sigma_1, averaged over images",
            }
            out["image_spectrum"] = {
                "relative_log_sigma": [image_spectrum(torch.cat(self.image_reps[i])).tolist() for i in range(depth)],
                "note": "SVD of the centred [images, D] matrix of mean patch tokens, log sigma_i - log sigma_1",
            }
        if "fourier" in self.measures:
            profiles = [relative_log_amplitude_profile(self.amp[i] / num_images) for i in range(depth)]
            out["fourier"] = {
                "delta_log_amplitude": [float(p[-1]) for p in profiles],
                "profile": [p.tolist() for p in profiles],
                "note": "log amp(highest freq) - log amp(0) of the token-grid FFT of block outputs, channel- and image-averaged",
            }
        return out


def _images_labels(batch):
    if isinstance(batch, dict):
        return batch["images"], batch.get("labels")
    if isinstance(batch, (tuple, list)):
        images = batch[0]
        if isinstance(images, (tuple, list)):  # multi-crop loaders: analyse the first (global) crop
            images = images[0]
        return images, batch[1] if len(batch) > 1 else None
    return batch, None


@torch.no_grad()
def _forward_stats(model, batches, geom, cfg, name) -> Tuple[Dict[str, object], int]:
    acc = _Accumulator(geom, cfg.measures)
    want_attn = "attention" in cfg.measures
    want_feat = "spectrum" in cfg.measures or "fourier" in cfg.measures
    num_images = 0
    if not (want_attn or want_feat):
        return {}, sum(_images_labels(b)[0].shape[0] for b in batches)
    with LayerRecorder(model, acc.on_attention if want_attn else None, acc.on_features if want_feat else None):
        for batch in tqdm(batches, desc=f"{name}: attention/features", disable=not cfg.progress, leave=False):
            images, _ = _images_labels(batch)
            model.forward_features(images)
            num_images += images.shape[0]
    return acc.results(num_images), num_images


def _curvature(model, batches, cfg) -> Dict[str, object]:
    gen = torch.Generator().manual_seed(cfg.seed)
    chosen = batches[: max(1, cfg.hessian_batches)]
    data = []
    for b in chosen:
        images, labels = _images_labels(b)
        if labels is None:
            raise ValueError("the Hessian measures need labelled batches (images, labels)")
        data.append((images, labels.long()))
    all_labels = torch.cat([l for _, l in data])
    num_classes = int(all_labels.max()) + 1

    if cfg.hessian_loss == "head":
        head_fn = model
        params = [p for p in model.parameters() if p.requires_grad]
        loss_desc = "cross-entropy of the model's own classifier head"
    else:
        with torch.no_grad():
            feats = torch.cat([pooled_features(model, x).float() for x, _ in data])
        probe = _fit_probe(feats, all_labels.to(feats.device), num_classes, cfg.probe_steps, cfg.seed)

        def head_fn(x):
            return probe(pooled_features(model, x).float())

        # The model's own classifier head does not feed the pooled features: leave it out.
        params = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] != "head"]
        loss_desc = "cross-entropy of a linear probe (L-BFGS on frozen pooled features) on top of the backbone"

    def loss_fn():
        total = 0.0
        for x, y in data:
            total = total + F.cross_entropy(head_fn(x).float(), y, reduction="sum")
        return total / all_labels.numel()

    out: Dict[str, object] = {"loss_definition": loss_desc, "num_params": sum(p.numel() for p in params),
                              "num_images": int(all_labels.numel()),
                              "attention_path": "explicit math (double backward; fused kernels have none)"}
    was_training = model.training
    model.eval()
    try:
        with math_attention(model):
            with torch.no_grad():
                out["loss"] = float(loss_fn())
            k = cfg.top_k if ("hessian" in cfg.measures or "landscape" in cfg.measures) else 0
            eigvals, eigvecs = top_eigenvalues(loss_fn, params, k, max_iter=cfg.power_iters, tol=cfg.power_tol,
                                               generator=gen, progress=cfg.progress)
            out["top_eigenvalues"] = eigvals
            if "hessian" in cfg.measures:
                tr, se = hutchinson_trace(loss_fn, params, cfg.trace_samples, generator=gen, progress=cfg.progress)
                out["trace"], out["trace_stderr"] = tr, se
            if "landscape" in cfg.measures:
                coords, losses = loss_landscape_2d(loss_fn, params, eigvecs[0], eigvecs[1], radius=cfg.landscape_radius,
                                                   steps=cfg.landscape_steps, progress=cfg.progress)
                out["landscape"] = {"coords": coords.tolist(), "loss": losses.tolist(),
                                    "directions": "top-2 Hessian eigenvectors (unit norm over all params)"}
    finally:
        model.train(was_training)
    return out


def analyze_model(model: nn.Module, batches: Sequence, cfg: Optional[AnalysisConfig] = None,
                  name: str = "model") -> Dict[str, object]:
    """Every requested measure for one ViT over ``batches`` (a list of (images, labels))."""
    cfg = cfg or AnalysisConfig()
    batches = list(batches)
    if not batches:
        raise ValueError("batches must contain at least one batch")
    model.eval()
    geom = vit_geometry(model)
    result: Dict[str, object] = dict(geom)
    stats, num_images = _forward_stats(model, batches, geom, cfg, name)
    result["num_images"] = num_images
    result.update(stats)
    if "hessian" in cfg.measures or "landscape" in cfg.measures:
        result["hessian"] = _curvature(model, batches, cfg)
    return result


def analyze_models(models: Dict[str, nn.Module], batches: Sequence,
                   cfg: Optional[AnalysisConfig] = None) -> Dict[str, object]:
    """``analyze_model`` for each named model on the same batches: ``{"config": ..., "models": {name: ...}}``."""
    cfg = cfg or AnalysisConfig()
    batches = list(batches)
    results = {}
    for name, model in models.items():
        results[name] = analyze_model(model, batches, cfg, name)
    notes = {
        "attention": "softmax(q k^T * scale) recomputed in float32 from each block's qkv projection (the fused "
                     "kernels never build the matrix); prefix tokens excluded from the distance only",
        "features": "block outputs (residual stream), patch tokens only",
        "curvature": "Hessian-vector products by double backward through the explicit-math attention path "
                     "(flash / fused attention kernels have no double backward)",
    }
    return {"config": asdict(cfg), "notes": notes, "models": results}
