"""Feature statistics of one layer: singular-value spectra and Fourier amplitudes.

Pure functions of a layer's patch-token features ``feats`` [B, N, D] (prefix tokens already
removed), computed in float64 so that tiny singular values and amplitudes survive the log.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "relative_log_singular_values",
    "token_spectrum",
    "image_spectrum",
    "fourier_amplitude",
    "relative_log_amplitude_profile",
    "fourier_relative_log_amplitude",
]

# Singular values / amplitudes are clamped to this fraction of the largest before the log, so a
# rank-deficient matrix gives a large negative, finite number instead of -inf (JSON has no inf).
_REL_FLOOR = 1e-12


def _check_feats(feats: torch.Tensor, name: str = "feats") -> None:
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B, N, D], got {type(feats).__name__}")
    if feats.dim() != 3:
        raise ValueError(f"{name} must have shape [B, N, D], got {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {feats.dtype}")


def relative_log_singular_values(matrix: torch.Tensor, center: bool = False) -> torch.Tensor:
    """``log sigma_i - log sigma_1`` of a matrix [..., M, D] (batched): [..., min(M, D)], float64.

    ``center`` subtracts the mean row first (the spectrum of the covariance rather than of the
    raw second moment).  Values are floored at log(1e-12).
    """
    m = matrix.double()
    if center:
        m = m - m.mean(-2, keepdim=True)
    sigma = torch.linalg.svdvals(m)
    top = sigma[..., :1].clamp_min(torch.finfo(torch.float64).tiny)
    return (sigma / top).clamp_min(_REL_FLOOR).log()


def token_spectrum(feats: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Token-level spectrum: the relative log singular values of each image's token matrix
    [N, D], averaged over images: [min(N, D)]."""
    _check_feats(feats)
    return relative_log_singular_values(feats, center=center).mean(0)


def image_spectrum(image_feats: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Image-level spectrum: relative log singular values of the [num_images, D] matrix of image
    representations (e.g. token means), centred over images by default: [min(num_images, D)]."""
    if not isinstance(image_feats, torch.Tensor) or image_feats.dim() != 2:
        raise ValueError(
            f"image_feats must be a tensor [num_images, D], got {getattr(image_feats, 'shape', type(image_feats))}"
        )
    spectrum = relative_log_singular_values(image_feats, center=center)
    # Centring removes one dimension: with M images the rank is at most M - 1.
    return spectrum[: image_feats.shape[0] - 1] if center and image_feats.shape[0] > 1 else spectrum


def _grid(grid_size) -> Tuple[int, int]:
    if isinstance(grid_size, int):
        return grid_size, grid_size
    gh, gw = grid_size
    return int(gh), int(gw)


def fourier_amplitude(feats: torch.Tensor, grid_size) -> torch.Tensor:
    """Mean 2-D amplitude spectrum |FFT| of features [B, N, D] laid out on the token grid
    [B, D, h, w], averaged over images and channels: [h, w] float64 (unshifted: [0, 0] is DC)."""
    _check_feats(feats)
    gh, gw = _grid(grid_size)
    b, n, d = feats.shape
    if n != gh * gw:
        raise ValueError(f"feats has N={n} tokens, which is not the grid {gh}x{gw}")
    grid = feats.double().transpose(1, 2).reshape(b, d, gh, gw)
    return torch.fft.fft2(grid).abs().mean(dim=(0, 1))


def relative_log_amplitude_profile(amp: torch.Tensor) -> torch.Tensor:
    """``log amp(k, k) - log amp(0, 0)`` along the diagonal of an [h, w] amplitude spectrum, from
    frequency 0 to the highest one (k = 0 .. min(h, w) // 2, i.e. 0 .. pi): [min(h, w) // 2 + 1]."""
    if amp.dim() != 2:
        raise ValueError(f"amp must have shape [h, w], got {tuple(amp.shape)}")
    gh, gw = amp.shape
    steps = min(gh, gw) // 2
    idx = torch.arange(steps + 1)
    if steps:
        rows, cols = (idx * gh) // (2 * steps), (idx * gw) // (2 * steps)
    else:
        rows, cols = idx, idx
    diag = amp[rows, cols]
    floor = amp.max().clamp_min(torch.finfo(torch.float64).tiny) * _REL_FLOOR
    return diag.clamp_min(floor).log() - diag[0].clamp_min(floor).log()


def fourier_relative_log_amplitude(feats: torch.Tensor, grid_size) -> Tuple[float, torch.Tensor]:
    """Fourier relative log amplitude of features [B, N, D] on the token grid.

    Returns ``(delta, profile)``: ``profile`` as in :func:`relative_log_amplitude_profile` of the
    channel- and image-averaged amplitude spectrum, and ``delta = profile[-1]``, the log amplitude
    of the highest frequency relative to the lowest (negative: the layer acts as a low-pass filter,
    as self-attention tends to; positive: it amplifies high frequencies, as convolutions tend to).
    """
    profile = relative_log_amplitude_profile(fourier_amplitude(feats, grid_size))
    return float(profile[-1]), profile
