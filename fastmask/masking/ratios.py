"""Per-sample ratios and the small argument checks the mask policies share."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ..philox import traced_generator

RatioSpec = Union[float, Tuple[float, float]]


def generator_device(generator: Optional[torch.Generator], device) -> torch.device:
    """Where random numbers are drawn: the generator's own device (a generator can only fill tensors
    there), else the target device (also inside torch.compile, which draws from the default generator:
    ``fastmask.philox.traced_generator``)."""
    generator = traced_generator(generator)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return torch.device(generator.device)
    return torch.device(device) if device is not None else torch.device("cpu")


def uniform(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """float32 U(0, 1) of ``shape`` drawn from ``generator`` and moved to ``device``."""
    draw_on = generator_device(generator, device)
    u = torch.rand(shape, generator=traced_generator(generator), device=draw_on)
    return u.to(device) if device is not None else u


def sample_ratios(
    batch: int,
    low: float,
    high: float,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """float32 [batch] per-sample ratios ``r ~ U(low, high)`` on ``device`` (``low == high`` gives the
    constant).  AttMask draws its mask ratio this way (r ~ U(0.1, 0.5)), and its hint ratio (U(0.01, 0.05)).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    check_range("low/high", (low, high), closed=True)
    u = uniform((batch,), generator, device)
    ratios = low + (high - low) * u
    # float32 rounding may land a hair above ``high``; keep the documented range.
    return ratios.clamp_(min=low, max=high)


def check_fraction(name: str, value, *, closed: bool = False) -> float:
    """A float in [0, 1) (or [0, 1] when ``closed``); ValueError/TypeError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok or math.isnan(value):
        raise ValueError(f"{name} must lie in [0, {'1]' if closed else '1)'}, got {value}")
    return value


def check_range(name: str, spec, *, closed: bool = False) -> RatioSpec:
    """A ratio given as a float, or a ``(low, high)`` range with ``low <= high``, inside [0, 1) ([0, 1])."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"{name} as a range must be (low, high), got {spec!r}")
        low = check_fraction(f"{name}[0]", spec[0], closed=closed)
        high = check_fraction(f"{name}[1]", spec[1], closed=closed)
        if low > high:
            raise ValueError(f"{name} must satisfy low <= high, got {spec!r}")
        return (low, high)
    return check_fraction(name, spec, closed=closed)


RATIO_PER = ("sample", "batch")


def check_ratio_per(value) -> str:
    if value not in RATIO_PER:
        raise ValueError(f"ratio_per must be one of {RATIO_PER}, got {value!r}")
    return value


def draw_ratio(spec: RatioSpec, batch: int, generator, device, per: str = "sample") -> Union[float, torch.Tensor]:
    """A float stays a float (one ratio for the whole batch); a range becomes a [batch] tensor: one
    draw per row (``per="sample"``), or one draw shared by every row (``per="batch"``, AttMask's
    ``get_pred_ratio()`` once per iteration).  The shared draw stays on the device (a [batch] tensor
    of one value, no host synchronisation) and costs no launch more than per-row draws."""
    if not isinstance(spec, tuple):
        return spec
    if per == "sample":
        return sample_ratios(batch, spec[0], spec[1], generator=generator, device=device)
    low, high = spec
    u = uniform((1,), generator, device).expand(batch)
    return (low + (high - low) * u).clamp_(min=low, max=high)


def counts_from_ratio(ratio: Union[float, torch.Tensor], num_tokens: int, batch: int, device) -> torch.Tensor:
    """``floor(ratio * N)`` per row (int64 [B]), rounded exactly as ``fastmask.ops`` rounds ratios."""
    from ..reference import counts_per_row

    return counts_per_row(ratio, num_tokens, batch, device)
