"""Per-epoch teacher-temperature warm-ups of DINO and iBOT.

``linspace`` is the official one: DINO's ``DINOLoss`` (main_dino.py) and iBOT's/AttMask's ``iBOTLoss``
(main_ibot.py, main_attmask.py) build ``np.linspace(warmup, final, warmup_epochs)`` followed by the
final value, so the final temperature is reached at epoch ``warmup_epochs - 1``.  ``linear`` is
fastmask's earlier ramp, ``warmup + (final - warmup) * epoch / warmup_epochs``, which reaches it one
epoch later.

iBOT's patch temperature with ``pred_start_epoch > 0`` holds the warm-up value until masking starts
and only then runs its warm-up (``teacher_temp2_schedule`` in ``iBOTLoss.__init__``): ``start_epoch``.
"""
from __future__ import annotations

__all__ = ["TEMP_WARMUPS", "teacher_temp_at"]

TEMP_WARMUPS = ("linspace", "linear")


def teacher_temp_at(epoch: int, warmup_temp: float, final_temp: float, warmup_epochs: int, *,
                    rule: str = "linspace", start_epoch: int = 0) -> float:
    """The teacher temperature at ``epoch`` (0-based): ``warmup_temp`` before ``start_epoch``, then a
    warm-up over ``warmup_epochs`` epochs (``rule``), then ``final_temp``."""
    if rule not in TEMP_WARMUPS:
        raise ValueError(f"teacher-temperature warm-up must be one of {TEMP_WARMUPS}, got {rule!r}")
    if epoch < start_epoch:
        return warmup_temp
    e = epoch - start_epoch
    if warmup_epochs <= 0 or e >= warmup_epochs:
        return final_temp
    steps = warmup_epochs - 1 if rule == "linspace" else warmup_epochs
    if steps == 0:  # np.linspace(a, b, 1) == [a]
        return warmup_temp
    if rule == "linspace":
        # numpy's arithmetic (start + i * step; the last point is exactly the stop value), so the
        # schedule is the official array value for value.
        return final_temp if e == steps else warmup_temp + e * ((final_temp - warmup_temp) / steps)
    return warmup_temp + (final_temp - warmup_temp) * e / steps
