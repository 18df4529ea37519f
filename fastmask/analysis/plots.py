"""Figures of the analysis results: one PNG per measure, the models side by side layer by layer.

Every figure is readable on its own: titles say what is measured and in what unit, axes are
labelled, and each model has its own colour (per-layer plots) or its own panel (curves and
landscapes).  Input is the dict returned by ``fastmask.analysis.analyze_models``.
"""
from __future__ import annotations

import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_all", "FIGURES"]

# measure key in the results -> (file name, title, y label)
_PER_HEAD = {
    "attention_distance": ("attention_distance.png", "Average attention distance per head",
                           "distance (pixels)"),
    "attention_entropy": ("attention_entropy.png", "Attention entropy per head", "entropy (nats)"),
    "attention_nmi": ("attention_nmi.png", "Normalised mutual information of attention, I(q,k)/sqrt(H(q)H(k))",
                      "NMI"),
}
FIGURES = [v[0] for v in _PER_HEAD.values()] + [
    "token_spectrum.png", "image_spectrum.png", "fourier.png", "hessian.png", "loss_landscape.png", "summary.png",
]


def _colors(n: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _plot_per_head(models: Dict[str, dict], key: str, path: str) -> None:
    fname, title, ylabel = _PER_HEAD[key]
    names = list(models)
    colors = _colors(len(names))
    depth = max(len(models[n][key]["per_head"]) for n in names)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * depth * max(1, len(names)) + 2), 4.2))
    rng = np.random.default_rng(0)
    for m, (name, color) in enumerate(zip(names, colors)):
        per_head = models[name][key]["per_head"]
        offset = (m - (len(names) - 1) / 2) * width
        for layer, heads in enumerate(per_head):
            xs = layer + offset + rng.uniform(-0.25, 0.25, len(heads)) * width
            ax.scatter(xs, heads, s=14, color=color, alpha=0.55, linewidths=0)
        means = models[name][key]["mean"]
        ax.plot(np.arange(len(means)) + offset, means, "-o", color=color, ms=5, lw=1.5,
                label=f"{name} (dots: heads, line: mean)")
    ax.set_xticks(range(depth))
    ax.set_xticklabels([str(i + 1) for i in range(depth)])
    ax.set_xlabel("layer (block)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _depth_colorbar(fig, axes, depth):
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(1, max(depth, 2)))
    cb = fig.colorbar(sm, ax=axes, shrink=0.9)
    cb.set_label("layer (block)")
    cb.locator = matplotlib.ticker.MaxNLocator(integer=True)
    cb.update_ticks()


def _plot_spectrum(models: Dict[str, dict], key: str, title: str, path: str) -> None:
    names = list(models)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 1.2, 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    depth = 1
    for ax, name in zip(axes, names):
        curves = models[name][key]["relative_log_sigma"]
        depth = max(depth, len(curves))
        cmap = plt.get_cmap("viridis")
        for layer, curve in enumerate(curves):
            ax.plot(np.arange(1, len(curve) + 1), curve, color=cmap(layer / max(len(curves) - 1, 1)), lw=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("singular value index i")
        ax.set_ylim(bottom=max(-12.0, ax.get_ylim()[0]))  # floored zeros would flatten the plot
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log sigma_i - log sigma_1")
    fig.suptitle(title, fontsize=11)
    _depth_colorbar(fig, list(axes), depth)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_fourier(models: Dict[str, dict], path: str) -> None:
    names = list(models)
    colors = _colors(len(names))
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1) + 1.2, 3.8), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    for name, color in zip(names, colors):
        delta = models[name]["fourier"]["delta_log_amplitude"]
        ax.plot(np.arange(1, len(delta) + 1), delta, "-o", color=color, ms=4, label=name)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("layer (block)")
    ax.set_ylabel("log amp(pi) - log amp(0)")
    ax.set_title("highest vs lowest frequency", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    depth = 1
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes[1:], names):
        profiles = models[name]["fourier"]["profile"]
        depth = max(depth, len(profiles))
        for layer, prof in enumerate(profiles):
            freqs = np.linspace(0, 1, len(prof))
            ax.plot(freqs, prof, color=cmap(layer / max(len(profiles) - 1, 1)), lw=1.2)
        ax.set_xlabel("frequency (x pi), along the diagonal")
        ax.set_title(f"{name}: relative log amplitude", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Fourier analysis of block outputs on the token grid", fontsize=11)
    _depth_colorbar(fig, list(axes[1:]), depth)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_hessian(models: Dict[str, dict], path: str) -> None:
    names = list(models)
    colors = _colors(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    k = max(len(models[n]["hessian"].get("top_eigenvalues", [])) for n in names)
    width = 0.8 / len(names)
    for m, (name, color) in enumerate(zip(names, colors)):
        eig = models[name]["hessian"].get("top_eigenvalues", [])
        xs = np.arange(len(eig)) + (m - (len(names) - 1) / 2) * width
        axes[0].bar(xs, eig, width=width, color=color, label=name)
    axes[0].set_xticks(range(k))
    axes[0].set_xticklabels([f"lambda_{i + 1}" for i in range(k)])
    axes[0].set_ylabel("eigenvalue")
    axes[0].set_title("top Hessian eigenvalues (power iteration)", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3, axis="y")
    traces = [models[n]["hessian"].get("trace", np.nan) for n in names]
    errs = [models[n]["hessian"].get("trace_stderr", 0.0) for n in names]
    axes[1].bar(range(len(names)), traces, yerr=np.nan_to_num(errs), color=colors, capsize=4)
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, fontsize=8)
    axes[1].set_ylabel("trace")
    axes[1].set_title("Hessian trace (Hutchinson, +- 1 s.e.)", fontsize=10)
    axes[1].grid(alpha=0.3, axis="y")
    loss_def = models[names[0]]["hessian"].get("loss_definition", "")
    fig.suptitle(f"Curvature of the loss: {loss_def}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_landscape(models: Dict[str, dict], path: str) -> None:
    names = [n for n in models if "landscape" in models[n].get("hessian", {})]
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names) + 1, 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        land = models[name]["hessian"]["landscape"]
        c = np.asarray(land["coords"])
        z = np.asarray(land["loss"])
        a, b = np.meshgrid(c, c, indexing="ij")
        cs = ax.contourf(b, a, z, levels=20, cmap="magma_r")
        ax.contour(b, a, z, levels=10, colors="k", linewidths=0.4, alpha=0.5)
        ax.plot([0], [0], "c*", ms=10)
        fig.colorbar(cs, ax=ax, shrink=0.85, label="loss")
        ax.set_xlabel("step along eigenvector 2")
        ax.set_ylabel("step along eigenvector 1")
        ax.set_title(name, fontsize=10)
    fig.suptitle("Loss landscape along the top-2 Hessian eigenvectors (star: the checkpoint)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_summary(models: Dict[str, dict], path: str) -> None:
    """One overview: the per-layer means of the attention and Fourier measures, models as lines."""
    panels = [
        ("attention_distance", "mean", "attention distance (pixels)"),
        ("attention_entropy", "mean", "attention entropy (nats)"),
        ("attention_nmi", "mean", "attention NMI"),
        ("fourier", "delta_log_amplitude", "log amp(pi) - log amp(0)"),
    ]
    first = next(iter(models.values()))
    panels = [p for p in panels if p[0] in first]
    if not panels:
        return
    names = list(models)
    colors = _colors(len(names))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (key, field, label) in zip(axes[0], panels):
        for name, color in zip(names, colors):
            ys = models[name][key][field]
            ax.plot(np.arange(1, len(ys) + 1), ys, "-o", color=color, ms=4, label=name)
        ax.set_xlabel("layer (block)")
        ax.set_title(label, fontsize=10)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("What each layer does (per-layer means; fastmask.analyze)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(results: Dict[str, object], out_dir: str) -> List[str]:
    """Write one PNG per measure present in ``results`` into ``out_dir``; returns the paths."""
    models: Dict[str, dict] = results["models"]
    os.makedirs(out_dir, exist_ok=True)
    first = next(iter(models.values()))
    written = []
    for key in _PER_HEAD:
        if key in first:
            p = os.path.join(out_dir, _PER_HEAD[key][0])
            _plot_per_head(models, key, p)
            written.append(p)
    if "token_spectrum" in first:
        for key, fname, title in (
            ("token_spectrum", "token_spectrum.png", "Token-level relative log singular values (per image, mean)"),
            ("image_spectrum", "image_spectrum.png", "Image-level relative log singular values (mean patch token)"),
        ):
            p = os.path.join(out_dir, fname)
            _plot_spectrum(models, key, title, p)
            written.append(p)
    if "fourier" in first:
        p = os.path.join(out_dir, "fourier.png")
        _plot_fourier(models, p)
        written.append(p)
    hess = first.get("hessian", {})
    if "trace" in hess or "top_eigenvalues" in hess:
        p = os.path.join(out_dir, "hessian.png")
        _plot_hessian(models, p)
        written.append(p)
    if "landscape" in hess:
        p = os.path.join(out_dir, "loss_landscape.png")
        _plot_landscape(models, p)
        written.append(p)
    if any(k in first for k in ("attention_distance", "fourier")):
        p = os.path.join(out_dir, "summary.png")
        _plot_summary(models, p)
        written.append(p)
    return written
