"""Compiling a method's training step: ``compile=none|blocks|step``.

* ``none``: eager.
* ``blocks``: ``torch.compile`` each ViT block and each head MLP in place (``nn.Module.compile``):
  the masking, the heads' glue, the loss and the optimizer-facing code stay eager.  Graph breaks
  between the compiled pieces do not matter; state-dict keys are unchanged.
* ``step``: one ``torch.compile(fullgraph=True)`` of the whole step: mask generation, forward of
  student and teacher, loss and backward (``loss.backward()`` / the method's own ``state.backward``
  calls are traced, ``torch._dynamo.config.trace_autograd_ops``), so Inductor fuses across the step
  and ``compile_mode="reduce-overhead"`` can replay it as one CUDA graph.  Any graph break is an
  error, not a silent fallback.

What stays outside the graph is what cannot be traced: ``Method.prepare_batch`` (host-side data
work such as timm's Mixup/CutMix, which draws from numpy), run eagerly before the compiled call.
The optimizer step, gradient clipping and the EMA update are the driver's and stay eager.

Randomness in a compiled step: a ``torch.Generator`` object cannot enter a graph (and the driver's
per-step generator would be a new guard every step), so the compiled step runs with
``state.generator = None``: masks, gates and ratios come from the device's default generator, which
the driver seeds from (seed, step, rank) before every step; the ops take their seeds as device
tensors drawn from it, so a replayed CUDA graph draws new masks every replay.

Per-step Python values that a method reads (the epoch for a temperature schedule) become guards:
the first change recompiles once with the value symbolic (Dynamo's automatic dynamic shapes), later
changes reuse that graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings
from collections import Counter
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "GraphBreaks", "compile_blocks", "compile_step", "count_graph_breaks",
           "resolve_compile_mode", "train_step_fn"]

COMPILE_MODES = ("none", "blocks", "step")
# How the config's `compile` may also be spelled (YAML booleans arrive as "on"/"off").
_ALIASES = {"": "none", "off": "none", "false": "none", "no": "none", "on": "step", "true": "step", "yes": "step"}

StepFn = Callable[[Any, Any], Tuple[torch.Tensor, Dict[str, Any]]]


def resolve_compile_mode(value) -> str:
    """``none``, ``blocks`` or ``step`` from the config value (``true`` means ``step``, ``false`` ``none``)."""
    if isinstance(value, bool):
        return "step" if value else "none"
    if not isinstance(value, str):
        raise ValueError(f"compile must be one of {COMPILE_MODES} (or true/false), got {value!r}")
    key = value.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES} (or true/false), got {value!r}")
    return key


def train_step_fn(method: nn.Module, forward: Optional[Callable] = None) -> StepFn:
    """``step(batch, state) -> (loss detached, metrics)``: forward, loss and backward of one step of
    ``method`` (eager).  ``batch`` must already have gone through ``method.prepare_batch``.
    ``forward`` replaces ``method.training_step`` as what computes ``(loss, metrics)`` (the driver's
    DDP wrapper around the method).

    Each call returns a function with its own code object (named after the method): Dynamo keys its
    cache, its recompile limit and its automatic-dynamic shape memory by code object, so two methods
    compiled in one process (a benchmark, the tests) must not share one."""

    run = forward if forward is not None else method.training_step

    def train_step(batch, state):
        loss, metrics = run(batch, state)
        # A manual-backward method back-propagates itself, all of it unless the driver asked it to
        # leave the last part (``defer_last_backward``) to this backward.
        if not method.manual_backward or getattr(state, "defer_last_backward", False):
            state.backward(loss)
        return loss.detach(), metrics

    name = f"train_step_{getattr(method, 'name', 'method')}_{id(method):x}"
    code = train_step.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, train_step.__globals__, name, None, train_step.__closure__)


def _prepare(method: nn.Module) -> Callable:
    prepare = getattr(method, "prepare_batch", None)
    return prepare if prepare is not None else (lambda batch, state: batch)


def compile_blocks(method: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` in place every ViT block (modules with ``blocks`` and ``forward_features``)
    and every projection-head MLP (``mlp`` next to a ``last_layer``); returns how many were compiled.

    Methods call ``forward_features``/``forward_cls`` rather than their models' ``forward``, so the
    compiled modules are the ones always entered through ``__call__``.  In place keeps state-dict
    keys, checkpoints and EMA pairing unchanged.
    """
    count = 0
    for module in method.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.Sequential) and hasattr(module, "forward_features"):
            for blk in blocks:
                blk.compile(**compile_kwargs)
                count += 1
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Sequential) and hasattr(module, "last_layer"):
            mlp.compile(**compile_kwargs)
            count += 1
    if count == 0:
        warnings.warn("compile=blocks: found no ViT blocks or head MLPs to compile")
    return count


def _traced_backward():
    # loss.backward() inside the compiled function is traced (not a graph break) with this flag.
    return torch._dynamo.config.patch(trace_autograd_ops=True)


def compile_step(
    method: nn.Module,
    mode: str = "step",
    *,
    compile_mode: Optional[str] = None,
    backend: str = "inductor",
    fullgraph: bool = True,
    dynamic: Optional[bool] = None,
    options: Optional[Dict[str, Any]] = None,
    forward: Optional[Callable] = None,
) -> StepFn:
    """The driver's training step for ``method``: ``step(batch, state) -> (loss detached, metrics)``
    runs ``method.prepare_batch`` eagerly, then forward + loss + backward, compiled as ``mode`` says
    (see the module docstring).  ``forward``: see ``train_step_fn``.  ``compile_mode`` is ``torch.compile``'s ``mode`` (``None``,
    ``"reduce-overhead"``, ``"max-autotune"``, ...), ``backend`` its backend (``"eager"`` and
    ``"aot_eager"`` trace without generating code: tests).  ``step.compiled`` is the compiled
    function (``None`` unless ``mode="step"``)."""
    mode = resolve_compile_mode(mode)
    if mode == "step" and forward is not None:
        # DDP's reducer hooks the autograd graph from outside it; a backward traced into the step's
        # graph has not been checked against them.  The blocks mode composes with DDP as before.
        raise ValueError("compile=step does not support DDP yet (world size > 1); use compile=blocks")
    prepare = _prepare(method)
    eager_step = train_step_fn(method, forward)
    kwargs = dict(backend=backend, mode=compile_mode, dynamic=dynamic, options=options)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    compiled = None
    if mode == "blocks":
        compile_blocks(method, **kwargs)
    elif mode == "step":
        compiled = torch.compile(eager_step, fullgraph=fullgraph, **kwargs)

    def step(batch, state):
        batch = prepare(batch, state)
        if compiled is None:
            return eager_step(batch, state)
        if getattr(state, "generator", None) is not None:
            state = dataclasses.replace(state, generator=None)
        with _traced_backward():
            return compiled(batch, state)

    step.compiled = compiled
    step.mode = mode
    return step


class GraphBreaks(NamedTuple):
    """What ``count_graph_breaks`` found: the graphs Dynamo made of one call, the breaks between
    them, and the reasons (first line of each, counted)."""

    graphs: int
    breaks: int
    reasons: Dict[str, int]


def count_graph_breaks(fn: Callable, *args, **kwargs) -> GraphBreaks:
    """Graph breaks of one call ``fn(*args, **kwargs)`` under Dynamo (``torch._dynamo.explain``; the
    call really runs, backward included, with ``loss.backward()`` traced as in ``compile=step``)."""
    torch._dynamo.reset()
    with _traced_backward():
        explained = torch._dynamo.explain(fn)(*args, **kwargs)
    torch._dynamo.reset()
    reasons = Counter(f"{str(b.reason).strip().splitlines()[0]} at {_where(b)}" for b in explained.break_reasons)
    return GraphBreaks(explained.graph_count, explained.graph_break_count, dict(reasons))


def _where(graph_break) -> str:
    stack = getattr(graph_break, "user_stack", None) or []
    if not stack:
        return "?"
    frame = stack[-1]
    return f"{frame.filename.rsplit('/fastmask/', 1)[-1]}:{frame.lineno}"



@contextlib.contextmanager
def no_recompiles():
    """Within the block, a recompilation is an error (``torch._dynamo.config.error_on_recompile``)."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
