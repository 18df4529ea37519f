"""Training methods, one module per paper.

The registry is lazy: a method's module (and whatever heavy imports it has) is only imported when
the method is asked for, so ``python -m fastmask.train --method dino`` never imports MaskSub's code.
Each module defines a module-level ``METHOD`` class, a subclass of :class:`fastmask.methods.base.Method`.
"""
from __future__ import annotations

import importlib

from .base import Method, StepState, ema_update_

__all__ = ["METHOD_MODULES", "Method", "StepState", "ema_update_", "get_method", "method_names"]

METHOD_MODULES = {
    "dino": "fastmask.methods.dino",
    "ibot": "fastmask.methods.ibot",
    "masksub": "fastmask.methods.masksub",
    "maskedkd": "fastmask.methods.maskedkd",
    "maskdistill": "fastmask.methods.maskdistill",
}


def method_names():
    return sorted(METHOD_MODULES)


def get_method(name: str) -> type:
    """Import the module of method ``name`` and return its ``METHOD`` class."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string naming a method, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    module = importlib.import_module(METHOD_MODULES[key])
    cls = getattr(module, "METHOD", None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{METHOD_MODULES[key]} must define METHOD, a subclass of fastmask.methods.base.Method")
    return cls
