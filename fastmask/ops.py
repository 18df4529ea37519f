"""fastmask's public drop-in ops (autograd-aware).

Every op checks its inputs, picks a backend for the call (see ``fastmask._backend``: ``cuda`` ->
``triton`` -> ``torch``, or the one forced with ``backend=`` / ``FASTMASK_BACKEND``) and makes one call
into its registered operator ``torch.ops.fastmask.<op>`` (``fastmask/library.py``: one schema for every
backend, fakes, autograd), so ``torch.compile(fullgraph=True)``, ``torch.export``, FakeTensor and CUDA
graphs see through it.  The PyTorch reference in ``fastmask.reference`` is the specification all
backends match.  Random ops take their seed as a device tensor (``fastmask.philox.seed_tensor``).

Conventions: masks are ``torch.bool`` with True = hidden; index tensors are int64; kept-index rows
produced by fastmask are sorted ascending.  Bad input raises ``ValueError``/``TypeError`` naming the
argument.  Checks that need the tensor's values (index range, uniqueness, NaN) synchronise with
the device; ``set_value_checks(False)`` turns them off for production loops once inputs are trusted.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import dispatch, library, reference
from ._backend import OP_BACKENDS, _can_run, backends, select  # noqa: F401  (re-exported)
from .flops import register_cpu_sdpa_flops
from .philox import seed_tensor
from .reference import MaskedTokens
from .sdist import sdist_loss, sdist_loss_linear  # noqa: F401  (self-distillation loss ops, fastmask/sdist.py)

__all__ = [
    "KeptTokens",
    "MaskedTokens",
    "apply_mask_token",
    "attention",
    "backends",
    "cls_attention_mask",
    "gather_tokens",
    "random_keep",
    "random_masking",
    "scatter_tokens",
    "set_value_checks",
    "topk_tokens",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_MODES = ("high", "low", "hint")

_VALUE_CHECKS = True


def set_value_checks(enabled: bool) -> bool:
    """Turn the value checks (index range/uniqueness, NaN scores) on or off; returns the old setting."""
    global _VALUE_CHECKS
    old, _VALUE_CHECKS = _VALUE_CHECKS, bool(enabled)
    return old


@contextlib.contextmanager
def value_checks(enabled: bool):
    old = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(old)


def _value_checks_on(t: Optional[torch.Tensor] = None) -> bool:
    # Value checks need host syncs and data-dependent control flow, which torch.compile cannot trace;
    # meta tensors have no values to check.  is_compiling() first: traced code then never reads the
    # global, so the driver turning checks off after its first step does not recompile a compiled step.
    return not torch.compiler.is_compiling() and _VALUE_CHECKS and (t is None or t.device.type != "meta")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------

def _check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (or None), got {type(t).__name__}")
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def _check_ids(ids, batch: int, num_tokens: int, name: str = "ids", unique: bool = True) -> None:
    _check_tensor(name, ids, 2, "[B, K]")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {ids.dtype}")
    if ids.shape[0] != batch:
        raise ValueError(f"{name} has batch {ids.shape[0]} but the tokens have batch {batch}")
    if ids.shape[1] > num_tokens:
        raise ValueError(f"{name} selects {ids.shape[1]} tokens per row but rows have only {num_tokens}")
    if _value_checks_on(ids) and ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"{name} must lie in [0, {num_tokens}), got values in [{lo}, {hi}]")
        if unique and ids.shape[1] > 1:
            s = torch.sort(ids, dim=1).values
            if bool((s[:, 1:] == s[:, :-1]).any()):
                raise ValueError(f"{name} must not repeat a token within a row")


def _check_ratio(name: str, value, batch: int, *, closed: bool = False, device=None) -> None:
    upper = "1]" if closed else "1)"
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} as a tensor must have shape [B]=[{batch}], got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        if device is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but the scores are on {device}")
        if _value_checks_on(value):
            bad = (value < 0) | ((value > 1) if closed else (value >= 1)) | torch.isnan(value)
            if bool(bad.any()):
                raise ValueError(f"{name} must lie in [0, {upper} for every sample")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    if not (0.0 <= value < 1.0 or (closed and value == 1.0)):
        raise ValueError(f"{name} must lie in [0, {upper}, got {value}")


def _measured(op: str, name: str, backend: Optional[str], device: torch.device, tensors, flags, run,
              grad_tensors=()) -> str:
    """Measured dispatch among the backends that can run ``op`` here (see ``fastmask.dispatch``);
    ``run(impl, *grad_tensors)`` calls the op with ``backend=impl``.  A forced backend is kept."""
    if dispatch.forced(backend):
        return name
    candidates = tuple(n for n in OP_BACKENDS[op] if _can_run(n, op, device)[0])

    def run_unchecked(impl, *ts):
        with value_checks(False):  # checked once already; timing must not sync
            return run(impl, *ts)
    return dispatch.choose_backend(op, name, device, tensors, flags, candidates, run_unchecked, grad_tensors)


# --------------------------------------------------------------------------------------------
# token gather / scatter / masking
# --------------------------------------------------------------------------------------------

def _check_pos_embed(pos_embed, x: torch.Tensor) -> None:
    if pos_embed is None:
        return
    if not isinstance(pos_embed, torch.Tensor):
        raise TypeError(f"pos_embed must be a tensor, got {type(pos_embed).__name__}")
    N, D = x.shape[1], x.shape[2]
    if tuple(pos_embed.shape) not in ((N, D), (1, N, D)):
        raise ValueError(f"pos_embed must have shape [N, D] or [1, N, D] = [1, {N}, {D}], got {tuple(pos_embed.shape)}")
    _check_float("pos_embed", pos_embed)
    _check_same_device("x", x, pos_embed=pos_embed)


def gather_tokens(
    x: torch.Tensor, ids: torch.Tensor, *, pos_embed: Optional[torch.Tensor] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """Select tokens: ``out[b, k] = x[b, ids[b, k]]`` (plus ``pos_embed[ids[b, k]]`` when given,
    added in float32: MAE adds positions before dropping tokens, this fuses both).

    x [B, N, D] float; ids [B, K] int64, unique per row (any order); pos_embed [N, D] or [1, N, D].
    Backward scatters the gradient into zeros (and sums it over the batch for ``pos_embed``).
    """
    _check_tensor("x", x, 3, "[B, N, D]")
    _check_float("x", x)
    _check_same_device("x", x, ids=ids)
    _check_ids(ids, x.shape[0], x.shape[1])
    _check_pos_embed(pos_embed, x)
    name = select("gather_tokens", x.device, backend)
    name = _measured("gather_tokens", name, backend, x.device, (x, ids, pos_embed), (),
                     lambda impl, x_, p_: gather_tokens(x_, ids, pos_embed=p_, backend=impl), (x, pos_embed))
    return library.gather_tokens(x, ids, pos_embed, name)


def scatter_tokens(
    x_kept: torch.Tensor,
    ids: torch.Tensor,
    num_tokens: int,
    fill: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Inverse of ``gather_tokens``: ``out[b, ids[b, k]] = x_kept[b, k]``, other rows ``fill`` or 0.

    x_kept [B, K, D]; ids [B, K] int64 unique per row; fill [D] (a mask token; receives gradient).
    """
    _check_tensor("x_kept", x_kept, 3, "[B, K, D]")
    _check_float("x_kept", x_kept)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < x_kept.shape[1]:
        raise ValueError(f"num_tokens must be an int >= K={x_kept.shape[1]}, got {num_tokens!r}")
    _check_same_device("x_kept", x_kept, ids=ids, fill=fill)
    _check_ids(ids, x_kept.shape[0], num_tokens)
    if ids.shape[1] != x_kept.shape[1]:
        raise ValueError(f"ids has {ids.shape[1]} tokens per row but x_kept has {x_kept.shape[1]}")
    if fill is not None:
        if not isinstance(fill, torch.Tensor) or fill.numel() != x_kept.shape[2] or fill.dim() not in (1, 2, 3):
            raise ValueError(f"fill must be a tensor of D={x_kept.shape[2]} values ([D], [1, D] or [1, 1, D])")
        _check_float("fill", fill)
    name = select("scatter_tokens", x_kept.device, backend)
    name = _measured("scatter_tokens", name, backend, x_kept.device, (x_kept, ids, fill), (num_tokens,),
                     lambda impl, x_, f_: scatter_tokens(x_, ids, num_tokens, f_, backend=impl), (x_kept, fill))
    return library.scatter_tokens(x_kept, ids, num_tokens, fill, name)


def apply_mask_token(
    x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """BEiT/iBOT/SimMIM replacement ``where(mask, mask_token, x)``; gradients reach x and mask_token.

    x [B, N, D] float; mask [B, N] bool (True = replace); mask_token [D] (or [1, 1, D]).
    """
    _check_tensor("x", x, 3, "[B, N, D]")
    _check_float("x", x)
    _check_tensor("mask", mask, 2, "[B, N]")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool (True = hidden), got {mask.dtype}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask must have shape [B, N] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    if not isinstance(mask_token, torch.Tensor) or mask_token.numel() != x.shape[2]:
        raise ValueError(f"mask_token must be a tensor of D={x.shape[2]} values")
    _check_float("mask_token", mask_token)
    _check_same_device("x", x, mask=mask, mask_token=mask_token)
    name = select("apply_mask_token", x.device, backend)
    name = _measured("apply_mask_token", name, backend, x.device, (x, mask, mask_token), (),
                     lambda impl, x_, t_: apply_mask_token(x_, mask, t_, backend=impl), (x, mask_token))
    return library.apply_mask_token(x, mask, mask_token, name)


class KeptTokens(NamedTuple):
    """Result of ``random_keep``: which tokens a row keeps, as indices and as a mask.

    ids_keep:    [B, K] int64, sorted ascending
    mask:        [B, N] bool, True = hidden (dropped)
    ids_restore: [B, N] int64, as in ``MaskedTokens``
    """

    ids_keep: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def _check_count(name: str, value, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def random_keep(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Union[int, torch.Tensor, None] = None,
    device=None,
    backend: Optional[str] = None,
) -> KeptTokens:
    """MAE's random token choice alone: keep ``K = int(N*(1-mask_ratio))`` tokens per row uniformly at
    random and return ``KeptTokens(ids_keep, mask, ids_restore)`` together, so token-drop (ids) and
    mask-token (mask) users need no conversion between them.  The same choice as ``random_masking``
    for the same seed.  ``seed``: an int or a one-element int64 tensor on ``device``; else drawn on the
    device from ``generator`` (no host sync, so a replayed CUDA graph draws a new choice each replay).
    """
    _check_count("batch_size", batch_size)
    _check_count("num_tokens", num_tokens)
    _check_ratio("mask_ratio", mask_ratio, batch_size)
    if isinstance(mask_ratio, torch.Tensor):
        raise TypeError("mask_ratio must be a float for random_keep (K is the same for every row)")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    device = torch.device(device)
    seed_t = seed_tensor(generator, seed, device)
    keep = reference.keep_count(num_tokens, mask_ratio)
    name = select("random_keep", device, backend)
    return KeptTokens(*library.random_keep(seed_t, batch_size, num_tokens, keep, name))


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Union[int, torch.Tensor, None] = None,
    pos_embed: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> MaskedTokens:
    """MAE-style random masking: keep ``K = int(N*(1-mask_ratio))`` tokens per row uniformly at random.

    The random choice comes from Philox keyed by ``seed`` (an int or a one-element int64 tensor; else
    a seed drawn on x's device from ``generator``, or from that device's default generator), identical
    on every backend.  ``pos_embed`` is added to the kept tokens as in ``gather_tokens``.  Returns
    ``MaskedTokens(x_kept, mask, ids_keep, ids_restore)``: the operators ``random_keep`` then
    ``gather_tokens``.
    """
    _check_tensor("x", x, 3, "[B, N, D]")
    _check_float("x", x)
    _check_ratio("mask_ratio", mask_ratio, x.shape[0])
    if isinstance(mask_ratio, torch.Tensor):
        raise TypeError("mask_ratio must be a float for random_masking (K is the same for every row)")
    _check_pos_embed(pos_embed, x)
    B, N, _ = x.shape
    name = select("random_masking", x.device, backend)
    seed_t = seed_tensor(generator, seed, x.device)
    name = _measured("random_masking", name, backend, x.device, (x, pos_embed), (mask_ratio,),
                     lambda impl, x_, p_: random_masking(x_, mask_ratio, seed=seed_t, pos_embed=p_, backend=impl).x_kept,
                     (x, pos_embed))
    ids_keep, mask, ids_restore = library.random_keep(seed_t, B, N, reference.keep_count(N, mask_ratio), name)
    x_kept = library.gather_tokens(x, ids_keep, pos_embed, name)
    return MaskedTokens(x_kept, mask, ids_keep, ids_restore)


# --------------------------------------------------------------------------------------------
# attention with the CLS map
# --------------------------------------------------------------------------------------------

def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    return_cls_attn: bool = False,
    num_prefix_tokens: int = 1,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention ``softmax(q k^T * scale) v`` over q, k, v [B, H, L, Dh].

    With ``return_cls_attn`` also returns ``cls_attn`` [B, L - num_prefix_tokens] float32: the
    attention of query 0 (CLS) over the patch keys, averaged over heads, without ever building the
    [B, H, L, L] matrix.  ``cls_attn`` carries no gradient; ``out`` has a full backward.
    """
    for name_, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name_, t, 4, "[B, H, L, Dh]")
        _check_float(name_, t)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have one shape [B, H, L, Dh]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_same_device("q", q, k=k, v=v)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or not 0 < num_prefix_tokens <= q.shape[2]:
        raise ValueError(f"num_prefix_tokens must be an int in [1, L={q.shape[2]}], got {num_prefix_tokens!r}")
    if q.shape[-1] == 0:
        raise ValueError(f"q, k and v must have a head dim Dh >= 1, got shape {tuple(q.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale, return_cls_attn = float(scale), bool(return_cls_attn)
    name = select("attention", q.device, backend)
    if not dispatch.forced(backend):
        name = dispatch.choose_backend(
            "attention", name, q.device, (q, k, v), (scale, return_cls_attn, num_prefix_tokens),
            _attention_candidates(q.device),
            lambda impl, q_, k_, v_: _run_attention(impl, q_, k_, v_, scale, return_cls_attn, num_prefix_tokens),
            (q, k, v),
        )
    return _run_attention(name, q, k, v, scale, return_cls_attn, num_prefix_tokens)


def _attention_candidates(device: torch.device) -> Tuple[str, ...]:
    # Measured-dispatch candidates besides the backends: SDPA with one backend each (the CLS map from
    # the one-launch CLS-row kernel where Triton runs, else from query 0's score row in torch).
    names = tuple(n for n in ("triton", "torch") if _can_run(n, "attention", device)[0])
    return names + (tuple(library.SDPA_BACKENDS) if device.type == "cuda" else ())


def _run_attention(impl: str, q, k, v, scale: float, return_cls_attn: bool, num_prefix_tokens: int):
    out, cls_attn, _ = library.attention(q, k, v, scale, return_cls_attn, num_prefix_tokens, impl)
    if not return_cls_attn:
        return out
    return out, cls_attn.detach()  # the map carries no gradient (the contract)


register_cpu_sdpa_flops()  # the torch backend runs SDPA: CPU FLOP counts must see it


# --------------------------------------------------------------------------------------------
# top-k token selection and AttMask masks
# --------------------------------------------------------------------------------------------

def _check_scores(name: str, scores) -> None:
    _check_tensor(name, scores, 2, "[B, N]")
    _check_float(name, scores)
    if _value_checks_on(scores) and bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN; top-k of NaN scores is undefined")


def topk_tokens(
    scores: torch.Tensor, k: int, *, largest: bool = True, backend: Optional[str] = None
) -> torch.Tensor:
    """Per-row indices of the ``k`` highest (``largest``) or lowest scores, sorted ascending.

    scores [B, N] float; ties go to the lower index, so the result is deterministic.  Returns [B, k] int64.
    """
    _check_scores("scores", scores)
    N = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= N:
        raise ValueError(f"k must be an int in [0, N={N}], got {k!r}")
    name = select("topk_tokens", scores.device, backend)
    name = _measured("topk_tokens", name, backend, scores.device, (scores,), (k, largest),
                     lambda impl: topk_tokens(scores, k, largest=largest, backend=impl))
    return library.topk_tokens(scores, k, bool(largest), name)


def _per_row_or_float(ratio: Union[float, torch.Tensor, None]) -> Tuple[Optional[torch.Tensor], float]:
    """The schema's two slots for a ratio: a per-row [B] tensor (the kernels compute
    floor(float64(r) * N) per row, sparing four elementwise launches), or one float for every row."""
    if isinstance(ratio, torch.Tensor):
        return ratio, 0.0
    return None, float(ratio or 0.0)


def cls_attention_mask(
    cls_attn: torch.Tensor,
    ratio: Union[float, torch.Tensor],
    *,
    mode: str = "high",
    mask_prob: float = 1.0,
    show_max: float = 0.1,
    show_ratio: Union[float, torch.Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """AttMask: a [B, N] bool mask (True = hidden) from a CLS attention map [B, N].

    ``high`` hides the ``int(ratio*N)`` most attended tokens, ``low`` the least attended; ``hint`` hides
    like ``high`` then reveals ``int(show_ratio*N)`` tokens drawn at random among the
    ``int(show_max*N)`` most attended.  ``ratio`` and ``show_ratio`` may be floats or per-sample [B]
    tensors.  Each row is masked with probability ``mask_prob`` and left fully visible otherwise.
    Ties in attention go to the lower index; randomness is Philox from ``seed``/``generator``.
    """
    _check_scores("cls_attn", cls_attn)
    B, N = cls_attn.shape
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    _check_ratio("ratio", ratio, B, device=cls_attn.device)
    _check_ratio("mask_prob", mask_prob, B, closed=True)
    if isinstance(mask_prob, torch.Tensor):
        raise TypeError("mask_prob must be a float")
    _check_ratio("show_max", show_max, B, closed=True)
    if isinstance(show_max, torch.Tensor):
        raise TypeError("show_max must be a float")
    if mode == "hint":
        if show_ratio is None:
            raise ValueError("mode='hint' needs show_ratio (e.g. 0.05, or a [B] tensor drawn from U(0.01, 0.05))")
        _check_ratio("show_ratio", show_ratio, B, device=cls_attn.device)
        if not isinstance(show_ratio, torch.Tensor) or _value_checks_on(show_ratio):
            max_shown = show_ratio.max().item() if isinstance(show_ratio, torch.Tensor) else show_ratio
            if int(max_shown * N) > int(show_max * N):
                raise ValueError(f"show_ratio ({max_shown}) reveals more tokens than the show_max={show_max} pool holds")
    name = select("cls_attention_mask", cls_attn.device, backend)
    seed_t = seed_tensor(generator, seed, cls_attn.device)
    name = _measured("cls_attention_mask", name, backend, cls_attn.device,
                     (cls_attn, *(r for r in (ratio, show_ratio) if isinstance(r, torch.Tensor))),
                     (mode, mask_prob > 0 and mask_prob < 1, isinstance(ratio, torch.Tensor)),
                     lambda impl: cls_attention_mask(cls_attn, ratio, mode=mode, mask_prob=mask_prob, show_max=show_max,
                                                     show_ratio=show_ratio, seed=seed_t, backend=impl))
    ratio_per_row, ratio_value = _per_row_or_float(ratio)
    show_per_row, show_value = _per_row_or_float(show_ratio if mode == "hint" else None)
    return library.cls_attention_mask(
        cls_attn, ratio_per_row, ratio_value, seed_t, mode, float(mask_prob), float(show_max),
        show_per_row, show_value, name,
    )
