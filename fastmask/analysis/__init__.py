"""Analysis toolkit of "Towards Understanding Masked Distillation": what a ViT's layers do.

Pure measures (tensors in, numbers out) live in ``attention``, ``features`` and ``hessian``;
``capture`` reads attention matrices and block outputs out of a timm-style ViT; ``runner`` runs
them over a few batches for one or more models; ``plots`` draws one figure per measure with the
models side by side.  The command line is ``python -m fastmask.analyze``.
"""
from .attention import attention_distance, attention_entropy, attention_nmi, patch_distance_matrix
from .capture import LayerRecorder, attention_matrix, find_blocks, math_attention
from .features import (
    fourier_amplitude,
    fourier_relative_log_amplitude,
    image_spectrum,
    relative_log_amplitude_profile,
    relative_log_singular_values,
    token_spectrum,
)
from .hessian import hutchinson_trace, hvp, loss_landscape_2d, top_eigenvalues
from .runner import ALL_MEASURES, AnalysisConfig, analyze_model, analyze_models, pooled_features, vit_geometry

__all__ = [
    "attention_distance", "attention_entropy", "attention_nmi", "patch_distance_matrix",
    "LayerRecorder", "attention_matrix", "find_blocks", "math_attention",
    "fourier_amplitude", "fourier_relative_log_amplitude", "image_spectrum",
    "relative_log_amplitude_profile", "relative_log_singular_values", "token_spectrum",
    "hutchinson_trace", "hvp", "loss_landscape_2d", "top_eigenvalues",
    "ALL_MEASURES", "AnalysisConfig", "analyze_model", "analyze_models", "pooled_features", "vit_geometry",
]
