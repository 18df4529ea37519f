"""Curvature of a loss: Hessian-vector products, top eigenvalues, trace, 2-D landscape.

Everything works on a closure ``loss_fn() -> scalar tensor`` and the list of parameters to
differentiate.  Hessian-vector products use double backward (Pearlmutter's trick: the gradient of
<grad L, v>), so every op inside ``loss_fn`` needs a twice-differentiable backward.  Fused
attention kernels (flash / memory-efficient SDPA, the fastmask Triton/CUDA kernels) do not have
one: models must run their explicit-math attention path here (see ``math_attention`` in
``fastmask.analysis.capture``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

__all__ = ["hvp", "top_eigenvalues", "hutchinson_trace", "loss_landscape_2d"]

LossFn = Callable[[], torch.Tensor]


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(xs, ys))


def _normalise(vs: List[torch.Tensor]) -> List[torch.Tensor]:
    norm = _dot(vs, vs).sqrt().clamp_min(1e-300)
    return [v / norm.to(v.dtype) for v in vs]


def _check_params(params) -> List[torch.Tensor]:
    params = [p for p in params]
    if not params:
        raise ValueError("params must be a non-empty list of tensors that require grad")
    for p in params:
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError("params must contain only tensors with requires_grad=True")
    return params


def hvp(loss_fn: LossFn, params: Sequence[torch.Tensor], vec: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Hessian of ``loss_fn()`` with respect to ``params`` applied to ``vec`` (one tensor per param)."""
    params = _check_params(params)
    vec = list(vec)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # Parameters the loss does not touch (or touches only linearly) have zero Hessian rows.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if live:
        hv = torch.autograd.grad(
            [grads[i] for i in live], params, grad_outputs=[vec[i] for i in live], allow_unused=True
        )
        out = [o if h is None else h.detach() for o, h in zip(out, hv)]
    return out


def top_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    k: int = 1,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> Tuple[List[float], List[List[torch.Tensor]]]:
    """The ``k`` Hessian eigenvalues of largest magnitude, by power iteration with deflation.

    Each eigenvector is found by repeated Hessian-vector products, re-orthogonalised against the
    ones already found at every step; iteration stops when the Rayleigh quotient changes by less
    than ``tol`` (relative).  Returns ``(eigenvalues, eigenvectors)``, eigenvectors as lists of
    tensors shaped like ``params`` with unit total norm.
    """
    params = _check_params(params)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values: List[float] = []
    vectors: List[List[torch.Tensor]] = []
    bar = tqdm(total=k * max_iter, desc="hessian eigenvalues", disable=not progress, leave=False)
    for _ in range(k):
        v = _normalise([torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params])
        eig = None
        for _it in range(max_iter):
            for u in vectors:  # deflate: stay orthogonal to the eigenvectors already found
                c = _dot(u, v)
                v = [vi - c.to(vi.dtype) * ui for vi, ui in zip(v, u)]
            v = _normalise(v)
            hv = hvp(loss_fn, params, v)
            new_eig = float(_dot(v, hv))
            v = _normalise(hv)
            bar.update(1)
            converged = eig is not None and abs(new_eig - eig) <= tol * (abs(eig) + 1e-12)
            eig = new_eig
            if converged:
                break
        values.append(eig)
        vectors.append(v)
    bar.close()
    return values, vectors


def hutchinson_trace(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    num_samples: int = 50,
    *,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> Tuple[float, float]:
    """Hutchinson's estimate of the Hessian trace, mean of v^T H v over Rademacher vectors v.

    Returns ``(trace, standard_error)``.  Exact for a diagonal Hessian (v_i^2 = 1).
    """
    params = _check_params(params)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    samples = []
    for _ in tqdm(range(num_samples), desc="hessian trace", disable=not progress, leave=False):
        v = [
            (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(device=p.device, dtype=p.dtype)
            for p in params
        ]
        samples.append(float(_dot(v, hvp(loss_fn, params, v))))
    t = torch.tensor(samples, dtype=torch.float64)
    stderr = float(t.std(unbiased=True) / len(samples) ** 0.5) if len(samples) > 1 else float("nan")
    return float(t.mean()), stderr


@torch.no_grad()
def loss_landscape_2d(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    dir1: Sequence[torch.Tensor],
    dir2: Sequence[torch.Tensor],
    *,
    radius: float = 1.0,
    steps: int = 11,
    progress: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss on the plane ``theta + a * dir1 + b * dir2`` for a, b on a ``steps`` x ``steps`` grid
    over [-radius, radius].  Returns ``(coords [steps], losses [steps, steps])`` (losses[i, j] at
    a = coords[i], b = coords[j]).  The parameters are restored afterwards, even on error."""
    params = [p for p in params]
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    coords = torch.linspace(-radius, radius, steps, dtype=torch.float64)
    losses = torch.empty(steps, steps, dtype=torch.float64)
    original = [p.detach().clone() for p in params]
    bar = tqdm(total=steps * steps, desc="loss landscape", disable=not progress, leave=False)
    try:
        for i, a in enumerate(coords.tolist()):
            for j, b in enumerate(coords.tolist()):
                for p, p0, d1, d2 in zip(params, original, dir1, dir2):
                    p.copy_(p0 + a * d1 + b * d2)
                losses[i, j] = float(loss_fn())
                bar.update(1)
    finally:
        for p, p0 in zip(params, original):
            p.copy_(p0)
        bar.close()
    return coords, losses
