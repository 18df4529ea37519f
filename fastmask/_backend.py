"""Backend discovery and per-call selection.

Order of preference for one call: ``cuda`` (the compiled extension ``fastmask._C``, when it was
built and the tensors live on a GPU) -> ``triton`` (GPU tensors, or CPU tensors when the Triton
interpreter is on with ``TRITON_INTERPRET=1``) -> ``torch`` (the reference in
``fastmask.reference``).  ``FASTMASK_BACKEND=torch|triton|cuda`` (or the ``backend=`` argument of an
op) forces one; forcing a backend that cannot run the call raises ``RuntimeError`` saying why, it
never falls back silently.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "torch")

# Which backends implement which op (the reference implements every op).
OP_BACKENDS: Dict[str, Tuple[str, ...]] = {
    "gather_tokens": ("cuda", "triton", "torch"),
    "scatter_tokens": ("cuda", "triton", "torch"),
    "random_masking": ("cuda", "triton", "torch"),
    "random_keep": ("cuda", "triton", "torch"),
    "apply_mask_token": ("cuda", "triton", "torch"),
    "attention": ("triton", "torch"),
    "topk_tokens": ("cuda", "triton", "torch"),
    "cls_attention_mask": ("cuda", "triton", "torch"),
    "sdist_loss": ("triton", "torch"),
}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _discover(name: str) -> Tuple[bool, str]:
    """Whether a backend can run at all here (independent of where the tensors live).

    Imports nothing heavy: triton is found, not imported (its backends import it on first launch).
    """
    if name == "torch":
        return True, "reference implementation, always available"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:  # pragma: no cover - triton is a hard dependency
            return False, "triton is not installed"
        version = importlib.metadata.version("triton")
        if torch.cuda.is_available():
            return True, f"triton {version} on CUDA devices"
        if triton_interpret():
            return True, f"triton {version} interpreter on the CPU (TRITON_INTERPRET=1)"
        return False, "no CUDA device, and TRITON_INTERPRET=1 is not set for the CPU interpreter"
    if name == "cuda":
        try:
            importlib.import_module("fastmask._C")
        except ImportError as exc:
            return False, (
                "the CUDA extension fastmask._C is not built "
                f"(FASTMASK_BUILD_CUDA=1 pip install --no-build-isolation -e .): {exc}"
            )
        if not torch.cuda.is_available():
            return False, "fastmask._C is built but no CUDA device is visible"
        return True, "fastmask._C on CUDA devices"
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


# Resolved once, at import, into plain module state: the per-call choice below is then dictionary
# lookups that torch.compile traces without a graph break (an import or an lru_cache is a break).
AVAILABLE: Dict[str, Tuple[bool, str]] = {name: _discover(name) for name in BACKENDS}


def _probe(name: str) -> Tuple[bool, str]:
    """(available, why) for a backend, as resolved at import."""
    if name not in AVAILABLE:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return AVAILABLE[name]


def backends() -> Dict[str, Dict[str, object]]:
    """What each backend can do here: ``{name: {"available": bool, "reason": str, "ops": [...]}}``, plus
    ``"dispatch"``: the measured choices so far, ``{fingerprint: {key: {"choice", "seconds"}}}``."""
    out = {}
    for name in BACKENDS:
        ok, why = _probe(name)
        out[name] = {
            "available": ok,
            "reason": why,
            "ops": sorted(op for op, bks in OP_BACKENDS.items() if name in bks),
        }
    forced = os.environ.get("FASTMASK_BACKEND")
    if forced:
        out["forced"] = forced
    from .dispatch import report  # measured choices per key (fastmask.dispatch)

    out["dispatch"] = report()
    return out


def _can_run(name: str, op: str, device: torch.device) -> Tuple[bool, str]:
    if name not in OP_BACKENDS[op]:
        return False, f"{op} has no {name} implementation (it has {', '.join(OP_BACKENDS[op])})"
    ok, why = _probe(name)
    if not ok:
        return False, why
    if name == "cuda" and device.type != "cuda":
        return False, f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    if name == "triton" and device.type != "cuda":
        if device.type == "cpu" and triton_interpret():
            return True, why
        return False, f"the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 (got {device.type})"
    return True, why


def select(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` on tensors living on ``device``.

    ``backend`` (a call's explicit choice) wins over ``FASTMASK_BACKEND``; either one that cannot run
    the call raises ``RuntimeError``.
    """
    forced = backend or os.environ.get("FASTMASK_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {forced!r}")
        ok, why = _can_run(forced, op, device)
        if not ok:
            source = "backend=" if backend else "FASTMASK_BACKEND="
            raise RuntimeError(f"{op}: {source}{forced!r} was forced but cannot run here: {why}")
        return forced
    for name in BACKENDS:
        if _can_run(name, op, device)[0]:
            return name
    return "torch"  # unreachable: torch can always run
