"""BEiT block-wise masks, generated for the whole batch at once with an exact count per sample.

BEiT (Bao et al., 2022) masks rectangles one at a time: area ~ U(min_num_patches, room), log aspect
ratio ~ U(log 0.3, log 1/0.3), a random position; a rectangle is accepted when it adds between 1
and ``room`` new patches, and the generator gives up after 10 rejected tries in a row.  Here every
sample of the batch makes one try per iteration (vectorised over [B, h, w] on the generator's
device), with the same acceptance rule.  BEiT may stop a few patches short of the target; we then
top the mask up with patches on the border of the masked region (then anywhere) so that every
sample hides exactly ``floor(ratio * h * w)`` patches.

No host sync: the number of tries is fixed from a host-side bound on the counts (``max_count``, which
the policy knows from its ratio), every sample runs every try (finished ones accept nothing), and the
top-up always runs (a no-op for complete rows), so a call can be captured in a CUDA graph or compiled.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..philox import traced_generator

MAX_TRIES = 10  # BEiT: rejected rectangles in a row before giving up on a sample


def block_masks(
    counts: torch.Tensor,
    grid_size: Tuple[int, int],
    *,
    min_num_patches: int = 16,
    max_num_patches: Optional[int] = None,
    aspect_ratio: Tuple[float, float] = (0.3, 1 / 0.3),
    generator: Optional[torch.Generator] = None,
    max_count: Optional[int] = None,
) -> torch.Tensor:
    """Block-wise masks [B, h*w] bool with exactly ``counts[b]`` hidden patches in row b.

    counts: int64 [B] (on the device the masks are built on, i.e. the generator's device).
    max_count: a host-side upper bound on ``counts`` (default ``h*w``); it sets the number of tries,
    so that nothing reads the counts back.
    """
    h, w = grid_size
    B = counts.shape[0]
    device = counts.device
    mask = torch.zeros(B, h, w, dtype=torch.bool, device=device)
    if B == 0 or h * w == 0:
        return mask.reshape(B, h * w)
    counts = counts.clamp(min=0, max=h * w)
    remaining = counts.clone()
    cap = h * w if max_num_patches is None else max_num_patches
    log_lo, log_hi = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    failures = torch.zeros(B, dtype=torch.int64, device=device)
    active = remaining > 0
    # Enough tries for every block of the largest target to need all its retries (plus one).
    bound = h * w if max_count is None else min(int(max_count), h * w)
    max_iters = MAX_TRIES * (bound // max(min_num_patches, 1) + 2)
    generator = traced_generator(generator)
    draws = torch.rand(max_iters, 4, B, generator=generator, device=device)  # one launch for all tries
    for it in range(max_iters):
        u_area, u_aspect, u_top, u_left = draws[it]
        room = remaining.clamp(max=cap).to(torch.float32)
        area = min_num_patches + (room - min_num_patches) * u_area
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_aspect)
        hh = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
        ww = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
        fits = (hh < h) & (ww < w)
        hh, ww = hh.clamp(max=h - 1), ww.clamp(max=w - 1)
        top = (u_top * (h - hh + 1)).to(torch.int64).clamp(max=h - hh)
        left = (u_left * (w - ww + 1)).to(torch.int64).clamp(max=w - ww)
        rect = (
            (rows >= top.view(B, 1, 1)) & (rows < (top + hh).view(B, 1, 1))
            & (cols >= left.view(B, 1, 1)) & (cols < (left + ww).view(B, 1, 1))
        )
        new = (rect & ~mask).sum(dim=(1, 2))
        accept = active & fits & (new > 0) & (new <= room.to(torch.int64))
        mask |= rect & accept.view(B, 1, 1)
        remaining = remaining - torch.where(accept, new, 0)
        failures = torch.where(accept, 0, failures + active.to(torch.int64))
        active = active & (remaining > 0) & (failures < MAX_TRIES)
    mask = mask.reshape(B, h * w)
    return _top_up(mask, remaining, (h, w), generator)


def _top_up(mask: torch.Tensor, remaining: torch.Tensor, grid_size, generator) -> torch.Tensor:
    """Hide ``remaining[b]`` more patches per row, preferring those touching the masked region
    (rows with nothing remaining are unchanged)."""
    h, w = grid_size
    B = mask.shape[0]
    grid = mask.view(B, 1, h, w).to(torch.float32)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=mask.device).view(1, 1, 3, 3)
    border = (F.conv2d(grid, kernel, padding=1).view(B, h * w) > 0) & ~mask
    # Priority: border patches first, then other visible ones, random within each group; hidden last.
    priority = torch.rand(B, h * w, generator=generator, device=mask.device)
    priority = priority + 2.0 * (~border) + 4.0 * mask
    rank = torch.argsort(torch.argsort(priority, dim=1), dim=1)
    return mask | (rank < remaining.view(B, 1))
