"""ViTs that run on all tokens, on a kept subset, or with mask tokens, and export the CLS map.

``MaskedViT`` is timm's ``VisionTransformer`` (same modules, same state-dict keys, plus one
``mask_token`` parameter) with ``fastmask.nn.Attention`` in every block and one forward entry::

    feats = model.forward_features(x, ids_keep=None, mask=None, return_cls_attn=False, attn_layer=-1)
    feats.cls       [B, D]      CLS token after the final norm
    feats.patch     [B, K|N, D] patch tokens after the final norm (the kept ones, in ids_keep order)
    feats.cls_attn  [B, K|N]    float32 CLS attention of block ``attn_layer`` (head mean), or None
    feats.prefix    [B, P, D]   all prefix tokens (CLS, DeiT distillation token, registers)

* ``ids_keep`` [B, K] int64 indexes the N patch tokens (prefix tokens are always kept and never
  listed).  Tokens are dropped after the positional embedding (MAE, MaskSub, MaskedKD's teacher), with
  the positional-embedding add fused into ``fastmask.ops.gather_tokens``.
* ``mask`` [B, N] bool (True = hidden) replaces patch embeddings with the learnable ``mask_token``
  before the positional embedding (BEiT, iBOT, AttMask, Masked Distillation) via
  ``fastmask.ops.apply_mask_token``.  Both may be given: the mask applies first, then the drop.
* Inputs of another resolution than ``img_size`` (DINO's local crops) get a resampled positional
  embedding.

For callers that build or select the token sequence themselves, the forward is split in two:
``embed(x, ids_keep=, mask=) -> tokens [B, P+K, D]`` (prefix tokens and positions included) and
``forward_features_from_tokens(tokens)`` (blocks + final norm).  MaskedKD's teacher, given
full-sequence indices ``ids_full`` (0 = CLS) chosen by a student, runs
``teacher.forward_from_tokens(ops.gather_tokens(teacher.embed(x), ids_full))``; with patch indices
alone ``teacher(x, ids_keep=ids)`` does the same and keeps the prefix automatically.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import resample_abs_pos_embed
from timm.layers import Attention as TimmAttention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer

from .. import ops
from ..nn import Attention, Block, convert_blocks

__all__ = [
    "CheckpointReport",
    "MaskedViT",
    "MaskedViTDistilled",
    "VIT_CONFIGS",
    "ViTFeatures",
    "convert_timm_vit",
    "create_vit",
    "load_checkpoint",
    "select_backbone_state",
    "vit_names",
]

_logger = logging.getLogger(__name__)

# Widths, depths and heads of the standard ViT sizes (Dosovitskiy et al.; DeiT's Tiny/Small).
VIT_CONFIGS: Dict[str, Dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


class ViTFeatures(NamedTuple):
    """What ``MaskedViT.forward_features`` returns: every token after the model's final ``norm``
    (timm makes that an Identity for average-pooling models, which normalise after pooling in
    ``fc_norm``; ``MaskedViT.classify`` applies it)."""

    cls: torch.Tensor  # [B, D]
    patch: torch.Tensor  # [B, K or N, D]
    cls_attn: Optional[torch.Tensor]  # [B, K or N] float32, or None
    prefix: torch.Tensor  # [B, P, D]


class MaskedViT(VisionTransformer):
    """timm ``VisionTransformer`` with token dropping, mask tokens and the CLS attention map.

    Takes timm's ``VisionTransformer`` arguments (the attention layer is always
    ``fastmask.nn.Attention``; a class token is required), or a model name first:
    ``MaskedViT("vit_small_patch14_dinov2", **kwargs)`` is ``timm.create_model(name, **kwargs)`` converted
    (timm's defaults, e.g. 1000 classes; see ``create_vit`` for the names).  See the module docstring
    for the forward.
    """

    def __new__(cls, *args, **kwargs):
        # MaskedViT("vit_small_patch16_224", ...) is timm.create_model(name, ...) converted: timm's
        # defaults (1000 classes), and the subclass the name needs (DeiT-distilled).
        if args and isinstance(args[0], str):
            if len(args) > 1:
                raise TypeError("MaskedViT(name, **kwargs): pass the arguments after the model name by keyword")
            model = create_vit(args[0], **{"num_classes": 1000, **kwargs})
            if not isinstance(model, cls):
                raise TypeError(f"{args[0]!r} builds a {type(model).__name__}, not a {cls.__name__}")
            return model
        return super().__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        if args and isinstance(args[0], str):
            return  # built by __new__ from the name
        if kwargs.get("attn_layer", Attention) not in (Attention, TimmAttention, "", "attn"):
            raise ValueError(f"MaskedViT always uses fastmask.nn.Attention; attn_layer={kwargs['attn_layer']!r} is not supported")
        kwargs["attn_layer"] = Attention
        super().__init__(*args, **kwargs)
        self._setup_masked()

    # ------------------------------------------------------------------------------------------
    # set-up shared by construction and in-place conversion
    # ------------------------------------------------------------------------------------------
    def _setup_masked(self) -> None:
        if getattr(self, "cls_token", None) is None:
            raise ValueError("MaskedViT needs a class token (class_token=True): the CLS features and map read it")
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if type(blk) not in (Block, TimmBlock) or type(attn) not in (Attention, TimmAttention):
                raise ValueError(
                    f"blocks[{i}] is {type(blk).__name__} with {type(attn).__name__}; MaskedViT supports the "
                    "standard ViT block (timm's Block with timm.layers.Attention)"
                )
        # Blocks become fastmask.nn.Block (a class swap, same parameters): they return the CLS map.
        convert_blocks(self.blocks, num_prefix_tokens=self.num_prefix_tokens)
        # Inputs of other resolutions are checked and handled here (positional-embedding resampling).
        if hasattr(self.patch_embed, "strict_img_size"):
            self.patch_embed.strict_img_size = False
        if not isinstance(getattr(self, "mask_token", None), nn.Parameter):
            ref = self.cls_token
            # Zeros, as iBOT's ``masked_embed``: the position embedding alone tells masked tokens apart.
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=ref.device, dtype=ref.dtype))

    # ------------------------------------------------------------------------------------------
    # geometry
    # ------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> Tuple[int, int]:
        """(h, w) patches at the model's ``img_size``."""
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return int(self.patch_embed.num_patches)

    @property
    def patch_size(self) -> Tuple[int, int]:
        return tuple(self.patch_embed.patch_size)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set(super().no_weight_decay()) | {"mask_token"}

    def grid_for(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) patches for an input of ``img_size`` = (H, W)."""
        ph, pw = self.patch_size
        H, W = img_size
        if getattr(self.patch_embed, "dynamic_img_pad", False):
            return (-(-H // ph), -(-W // pw))
        return (H // ph, W // pw)

    def _check_images(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be an image tensor [B, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        in_chans = self.patch_embed.proj.in_channels
        if x.shape[1] != in_chans:
            raise ValueError(f"x has {x.shape[1]} channels but the model expects {in_chans}")
        ph, pw = self.patch_size
        H, W = x.shape[-2:]
        if not getattr(self.patch_embed, "dynamic_img_pad", False) and (H % ph or W % pw):
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {ph}x{pw}")

    def _pos_embed_for(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        if self.pos_embed is None:
            return None
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=list(grid),
            old_size=list(self.grid_size),
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        # timm's order: class token, DeiT distillation token, register tokens.
        parts = [self.cls_token]
        if getattr(self, "dist_token", None) is not None:
            parts.append(self.dist_token)
        if getattr(self, "reg_token", None) is not None:
            parts.append(self.reg_token)
        prefix = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if prefix.shape[1] != self.num_prefix_tokens:
            raise ValueError(
                f"the model has {prefix.shape[1]} prefix tokens but num_prefix_tokens={self.num_prefix_tokens}"
            )
        return prefix.expand(batch, -1, -1)

    # ------------------------------------------------------------------------------------------
    # input checks for ids_keep / mask
    # ------------------------------------------------------------------------------------------
    def _check_ids_keep(self, ids_keep, batch: int, num_patches: int, device) -> None:
        if not isinstance(ids_keep, torch.Tensor):
            raise TypeError(f"ids_keep must be an int64 tensor [B, K], got {type(ids_keep).__name__}")
        if ids_keep.dtype != torch.int64:
            raise TypeError(f"ids_keep must be int64 (torch.long), got {ids_keep.dtype}")
        if ids_keep.dim() != 2 or ids_keep.shape[0] != batch or ids_keep.shape[1] > num_patches:
            raise ValueError(
                f"ids_keep must have shape [B, K] with B={batch} and K <= N={num_patches} patches, "
                f"got {tuple(ids_keep.shape)}"
            )
        if ids_keep.device != device:
            raise ValueError(f"ids_keep is on {ids_keep.device} but the images are on {device}")
        if ops._value_checks_on() and ids_keep.numel() > 0:
            lo, hi = int(ids_keep.min()), int(ids_keep.max())
            if lo < 0 or hi >= num_patches:
                raise ValueError(
                    f"ids_keep must index the N={num_patches} patch tokens, [0, {num_patches}) (prefix tokens are "
                    f"always kept and are not listed), got values in [{lo}, {hi}]"
                )

    def _check_mask(self, mask, batch: int, grid: Tuple[int, int], device) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor [B, N], got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool (True = replaced by the mask token), got {mask.dtype}")
        N = grid[0] * grid[1]
        if tuple(mask.shape) != (batch, N):
            raise ValueError(
                f"mask must have shape [B, N] = [{batch}, {N}] ({grid[0]}x{grid[1]} patches), got {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the images are on {device}")

    def _check_attn_layer(self, attn_layer) -> int:
        depth = len(self.blocks)
        if isinstance(attn_layer, bool) or not isinstance(attn_layer, int) or not -depth <= attn_layer < depth:
            raise ValueError(f"attn_layer must be an int in [-{depth}, {depth}) (a block index), got {attn_layer!r}")
        return attn_layer % depth

    # ------------------------------------------------------------------------------------------
    # forward pieces
    # ------------------------------------------------------------------------------------------
    def embed(
        self,
        x: torch.Tensor,
        *,
        ids_keep: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Images [B, C, H, W] -> the token sequence [B, P + (K or N), D] that enters the first block:
        patch embedding, mask tokens (``mask``), positional embedding, token drop (``ids_keep``),
        prefix tokens, then timm's ``pos_drop``/``patch_drop``/``norm_pre``."""
        self._check_images(x)
        B = x.shape[0]
        grid = self.grid_for(tuple(x.shape[-2:]))
        if mask is not None:
            self._check_mask(mask, B, grid, x.device)
        tokens = self.patch_embed(x)
        if tokens.dim() == 4:  # dynamic_img_size models emit NHWC
            tokens = tokens.flatten(1, 2)
        N = tokens.shape[1]
        if ids_keep is not None:
            self._check_ids_keep(ids_keep, B, N, x.device)
        if mask is not None:
            tokens = ops.apply_mask_token(tokens, mask, self.mask_token)

        pos = self._pos_embed_for(grid)
        P = self.num_prefix_tokens
        if pos is None:
            patch_pos = prefix_pos = None
        elif self.no_embed_class:
            patch_pos, prefix_pos = pos, None
        else:
            patch_pos, prefix_pos = pos[:, P:], pos[:, :P]
        if ids_keep is not None:
            # Positions are added to the kept tokens only, in the same pass that gathers them.
            tokens = ops.gather_tokens(tokens, ids_keep, pos_embed=patch_pos)
        elif patch_pos is not None:
            tokens = tokens + patch_pos
        prefix = self._prefix_tokens(B)
        if prefix_pos is not None:
            prefix = prefix + prefix_pos
        if mask is None and self.mask_token.requires_grad and torch.is_grad_enabled():
            # Keep mask_token in the graph (with a zero gradient) on unmasked calls, so DDP does not
            # stop on an unused parameter when a method masks only some of its forwards.
            prefix = prefix + 0.0 * self.mask_token
        seq = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        seq = self.pos_drop(seq)
        seq = self.patch_drop(seq)
        return self.norm_pre(seq)

    def _run_blocks(
        self, tokens: torch.Tensor, return_cls_attn: bool, attn_layer: int
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(
                f"tokens must be [B, L, D={self.embed_dim}] (prefix tokens first), got {getattr(tokens, 'shape', None)}"
            )
        if tokens.shape[1] < self.num_prefix_tokens:
            raise ValueError(f"tokens must start with the {self.num_prefix_tokens} prefix tokens; got L={tokens.shape[1]}")
        layer = self._check_attn_layer(attn_layer)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        cls_attn = None
        x = tokens
        for i, blk in enumerate(self.blocks):
            # Only the block whose map is asked for returns it (the others skip its computation).
            capture = return_cls_attn and i == layer
            if use_ckpt:
                out = checkpoint(blk, x, return_cls_attn=capture, use_reentrant=False)
            else:
                out = blk(x, return_cls_attn=capture)
            x, cls_attn = out if capture else (out, cls_attn)
        return self.norm(x), cls_attn

    def _features(self, seq: torch.Tensor, cls_attn: Optional[torch.Tensor]) -> ViTFeatures:
        P = self.num_prefix_tokens
        return ViTFeatures(cls=seq[:, 0], patch=seq[:, P:], cls_attn=cls_attn, prefix=seq[:, :P])

    def forward_features_from_tokens(
        self, tokens: torch.Tensor, *, return_cls_attn: bool = False, attn_layer: int = -1
    ) -> ViTFeatures:
        """Blocks + final norm on a ready token sequence [B, P + K, D] (prefix tokens first, positions
        already added), e.g. ``ops.gather_tokens(model.embed(x), ids_full)`` with full-sequence
        indices that include the prefix positions (MaskedKD's teacher)."""
        seq, cls_attn = self._run_blocks(tokens, return_cls_attn, attn_layer)
        return self._features(seq, cls_attn)

    def forward_features(self, x: torch.Tensor, *, ids_keep: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None, return_cls_attn: bool = False,
                         attn_layer: int = -1) -> ViTFeatures:
        """Images [B, C, H, W] -> ``ViTFeatures`` (see the module docstring)."""
        tokens = self.embed(x, ids_keep=ids_keep, mask=mask)
        return self.forward_features_from_tokens(tokens, return_cls_attn=return_cls_attn, attn_layer=attn_layer)

    def classify(self, features: ViTFeatures) -> torch.Tensor:
        """Classifier logits from ``forward_features``' output (timm's pooling, fc_norm and head)."""
        return self.forward_head(torch.cat([features.prefix, features.patch], dim=1))

    def forward_from_tokens(
        self, tokens: torch.Tensor, *, return_cls_attn: bool = False, attn_layer: int = -1
    ):
        """Logits from a ready token sequence (see ``forward_features_from_tokens``); with
        ``return_cls_attn`` returns ``(logits, cls_attn)``."""
        seq, cls_attn = self._run_blocks(tokens, return_cls_attn, attn_layer)
        logits = self.forward_head(seq)
        return (logits, cls_attn) if return_cls_attn else logits

    def forward(self, x: torch.Tensor, *, ids_keep: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, return_cls_attn: bool = False, attn_layer: int = -1):
        """Classifier logits (timm's head; DeiT-distilled models follow timm's distilled head).
        With ``return_cls_attn`` returns ``(logits, cls_attn)``."""
        tokens = self.embed(x, ids_keep=ids_keep, mask=mask)
        return self.forward_from_tokens(tokens, return_cls_attn=return_cls_attn, attn_layer=attn_layer)


class MaskedViTDistilled(MaskedViT, VisionTransformerDistilled):
    """``MaskedViT`` on timm's DeiT ``VisionTransformerDistilled`` (CLS + distillation token: 2 prefix
    tokens; the CLS map leaves both out; ``forward`` returns timm's distilled-head logits)."""


_CONVERTED_CLASSES: Dict[type, type] = {VisionTransformer: MaskedViT, VisionTransformerDistilled: MaskedViTDistilled}


def convert_timm_vit(model: nn.Module) -> MaskedViT:
    """Turn a timm ``VisionTransformer`` (or a subclass such as DeiT's distilled ViT) into a
    ``MaskedViT`` in place and return it.

    Parameters stay the same objects, so weights, outputs and optimiser references are unchanged;
    the attention modules become ``fastmask.nn.Attention`` and a zero ``mask_token`` is added.
    """
    if isinstance(model, MaskedViT):
        return model
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    cls = type(model)
    new_cls = _CONVERTED_CLASSES.get(cls)
    if new_cls is None:
        # Keep the subclass's own methods (its _pos_embed/forward_head) beneath MaskedViT's forward.
        new_cls = type(f"Masked{cls.__name__}", (MaskedViT, cls), {"__doc__": f"MaskedViT over {cls.__name__}."})
        _CONVERTED_CLASSES[cls] = new_cls
    old_cls = model.__class__
    model.__class__ = new_cls
    try:
        model._setup_masked()
    except Exception:
        model.__class__ = old_cls
        raise
    return model


_NAME_RE = re.compile(r"^(vit_(?:tiny|small|base|large))(?:_patch(\d+))?(?:_(\d+))?$")
# timm's entry-point modules whose models are VisionTransformer subclasses (ViT/AugReg/DINO/DINOv2/
# CLIP/SigLIP/... and DeiT/DeiT-III).
_TIMM_VIT_MODULES = ("vision_transformer", "deit")
_TIMM_NAMES: Optional[List[str]] = None


def vit_names() -> List[str]:
    """Every name ``create_vit`` accepts: the four presets and timm's ViT/DeiT model names (those
    without a class token, e.g. SigLIP's ``map`` pooling, are refused when built)."""
    global _TIMM_NAMES
    if _TIMM_NAMES is None:
        import timm

        _TIMM_NAMES = sorted({n for mod in _TIMM_VIT_MODULES for n in timm.list_models(module=mod)})
    return sorted(VIT_CONFIGS) + _TIMM_NAMES


def _unknown_name(name: str) -> ValueError:
    close = difflib.get_close_matches(name, vit_names(), n=5, cutoff=0.5)
    hint = f"closest valid names: {', '.join(close)}" if close else f"valid names include {sorted(VIT_CONFIGS)}"
    return ValueError(
        f"unknown ViT {name!r}; {hint} (any timm ViT/DeiT name such as 'vit_small_patch14_dinov2', "
        "'deit3_small_patch16_224', 'vit_base_patch16_clip_224', or a preset like 'vit_small_patch16_224')"
    )


def _create_timm_vit(name: str, *, distilled: bool, **kwargs: Any) -> MaskedViT:
    import timm
    from timm.models import split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if arch not in vit_names():
        if timm.is_model(arch):
            raise ValueError(
                f"timm model {name!r} (timm module {_timm_module(arch)!r}) is not a VisionTransformer; MaskedViT "
                f"wraps timm's ViT/DeiT family (modules {', '.join(_TIMM_VIT_MODULES)})"
            )
        raise _unknown_name(name)
    # pretrained=False: timm only builds the architecture (random init); nothing is downloaded.
    model = timm.create_model(name, pretrained=False, **kwargs)
    if distilled and not isinstance(model, VisionTransformerDistilled):
        raise ValueError(f"distilled=True, but {name!r} has no distillation token; use a *_distilled_* DeiT name")
    return convert_timm_vit(model)


def _timm_module(arch: str) -> str:
    import timm

    for mod in timm.list_modules():
        if arch in timm.list_models(module=mod):
            return mod
    return "?"


def create_vit(
    name: str,
    *,
    patch_size: Optional[int] = None,
    img_size: Optional[int] = None,
    num_classes: int = 0,
    drop_path_rate: float = 0.0,
    distilled: bool = False,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_key: Optional[str] = None,
    drop_path_schedule: str = "linear",
    **kwargs: Any,
) -> MaskedViT:
    """A ``MaskedViT`` by name, randomly initialised or loaded from a local ``checkpoint`` (nothing is
    ever downloaded).

    name: a preset, ``vit_tiny`` / ``vit_small`` / ``vit_base`` / ``vit_large``, optionally timm-style
        with patch size and resolution (``vit_small_patch16_224``; default patch 16, 224 px), or any timm
        ViT/DeiT model name (``deit_small_distilled_patch16_224``, ``deit3_base_patch16_224``,
        ``vit_small_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``, ``vit_base_patch16_clip_224``,
        ``vit_small_patch16_224.dino``, ...), built by ``timm.create_model(name, pretrained=False)``
        with the same modules and state-dict keys as timm's.  A name that is neither raises a
        ``ValueError`` listing the closest valid names (``vit_names()`` lists them all).
    patch_size / img_size: override the name's (use patch 8 or 4 for 32-96 px images).
    num_classes: classifier outputs (0 = no classifier; ``forward`` then returns the pooled features).
    distilled: add a DeiT distillation token to a preset (``MaskedViTDistilled``, 2 prefix tokens);
        timm's ``*_distilled_*`` names have it already.
    checkpoint: a local file for ``load_checkpoint`` (timm ``.pth``/``.safetensors``, DeiT/MAE,
        DINO/iBOT, a driver ``checkpoint.pt``), loaded strictly; ``checkpoint_key`` picks its entry
        (``teacher``, ``student``, ...).
    drop_path_schedule: ``linear`` (timm: 0 in the first block rising to ``drop_path_rate`` in the last)
        or ``constant`` (``drop_path_rate`` in every block, DeiT-III's models_v2.py ``vit_models``).
    kwargs: any other timm ``VisionTransformer`` argument (``embed_dim``, ``depth``, ``num_heads``,
        ``reg_tokens``, ``qk_norm``, ``init_values``, ``global_pool``, ...) overriding the name's.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string such as 'vit_small', got {type(name).__name__}")
    pretrained = kwargs.pop("pretrained", False)
    if pretrained:
        raise ValueError(
            "create_vit never downloads weights; pass checkpoint='/path/to/weights.pth' (or .safetensors) instead "
            f"of pretrained={pretrained!r}"
        )
    for arg, value in (("patch_size", patch_size), ("img_size", img_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if drop_path_schedule not in ("linear", "constant"):
        raise ValueError(f"drop_path_schedule must be 'linear' or 'constant', got {drop_path_schedule!r}")
    match = _NAME_RE.match(name)
    if match is not None:
        base, name_patch, name_img = match.groups()
        patch_size = patch_size if patch_size is not None else int(name_patch or 16)
        img_size = img_size if img_size is not None else int(name_img or 224)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        cfg = dict(VIT_CONFIGS[base])
        cfg.update(kwargs)
        cls = MaskedViTDistilled if distilled else MaskedViT
        if distilled and cfg.get("reg_tokens", 0):
            raise ValueError("distilled=True does not combine with reg_tokens (timm's DeiT has no registers)")
        model = cls(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                    drop_path_rate=drop_path_rate, **cfg)
    else:
        geometry = {k: v for k, v in (("patch_size", patch_size), ("img_size", img_size)) if v is not None}
        if patch_size is not None and img_size is not None and img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        model = _create_timm_vit(name, distilled=distilled, num_classes=num_classes,
                                 drop_path_rate=drop_path_rate, **geometry, **kwargs)
    if drop_path_schedule == "constant" and drop_path_rate > 0:
        from timm.layers import DropPath

        for block in model.blocks:
            block.drop_path1 = DropPath(drop_path_rate)
            block.drop_path2 = DropPath(drop_path_rate)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, key=checkpoint_key)
    return model


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

class CheckpointReport(NamedTuple):
    """What ``load_checkpoint`` did."""

    source_key: Optional[str]  # the entry of the checkpoint dict that held the weights (None = top level)
    missing_keys: List[str]  # model keys the checkpoint did not provide (left as they were)
    unexpected_keys: List[str]  # checkpoint keys the model has no place for (only when strict=False)
    ignored_keys: List[str]  # projection-head / mismatched classifier keys that were skipped on purpose
    resized_keys: List[str]  # keys that were resampled (pos_embed on a different grid)


# Entries of a checkpoint dict that may hold the state dict, in order of preference: DINO/iBOT
# evaluate the teacher; timm/DeiT/MAE/fastmask's driver use 'model' or 'state_dict'.
_STATE_KEYS = ("teacher", "student", "model", "state_dict", "model_ema", "module")
# Keys a checkpoint may lack without the load being incomplete.
_OPTIONAL_PREFIXES = ("mask_token", "head.", "head_dist.")
# MAE checkpoints keep their pixel decoder next to the encoder.
_DECODER_PREFIXES = ("decoder_", "decoder.")


def _read_file(path: Union[str, os.PathLike], *, full_pickle: bool = False) -> Any:
    """The object in a local ``.safetensors`` or ``torch.save`` file, on the CPU.  ``full_pickle``:
    the file holds Python objects besides tensors (the training driver's checkpoints), unpickle it
    at once rather than after the weights-only loader refused it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r} (fastmask never downloads weights)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if full_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        # DINO/iBOT checkpoints pickle their argparse Namespace next to the weights, which the
        # weights-only unpickler refuses.  The file is the user's own local checkpoint.
        _logger.info("weights-only load of %s failed (%s); loading it as a full pickle", path, exc)
        return torch.load(path, map_location="cpu", weights_only=False)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


# Where a driver checkpoint (``python -m fastmask.train``) keeps the ViT inside the method's state:
# the student's backbone (DINO/iBOT wrappers), the student itself (MaskSub, MaskedKD, MaskDistill), ...
_DRIVER_PREFIXES = ("student.backbone.", "student.", "backbone.", "model.", "module.", "")


def is_driver_checkpoint(ckpt: Any) -> bool:
    """A file written by the training driver: the run's config next to the method's state dict."""
    return isinstance(ckpt, dict) and "config" in ckpt and _is_state_dict(ckpt.get("method"))


def select_backbone_state(sd: Dict[str, torch.Tensor], prefix: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """The ViT weights inside ``sd`` and the prefix they were under (stripped).

    ``prefix`` names a sub-module, e.g. ``teacher.`` (its ``backbone.`` is looked in too, for the
    DINO/iBOT wrappers); without it the first of student.backbone. / student. / backbone. / model. /
    module. / (none) that holds a patch embedding is taken.
    """
    if prefix is None:
        candidates = _DRIVER_PREFIXES
    else:
        p = prefix if prefix == "" or prefix.endswith(".") else prefix + "."
        candidates = (p, p + "backbone.")
    for p in candidates:
        if f"{p}patch_embed.proj.weight" in sd:
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, p
    have = sorted({k.split(".")[0] for k in sd})
    raise ValueError(
        f"no ViT weights (patch_embed.proj.weight) under prefix {candidates if prefix is None else prefix!r}; "
        f"top-level names in the checkpoint: {have}"
    )


def _select_state_dict(ckpt: Any, key: Optional[str]) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    if hasattr(ckpt, "state_dict") and isinstance(ckpt, nn.Module):
        ckpt = ckpt.state_dict()
    if is_driver_checkpoint(ckpt):
        # Our own training checkpoint: key names a sub-module of the method (default: the student).
        sd, used = select_backbone_state(ckpt["method"], key)
        return sd, f"method[{used}]"
    if key is not None:
        if not isinstance(ckpt, dict) or key not in ckpt:
            have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise KeyError(f"key={key!r} is not in the checkpoint; it has {have}")
        sd = ckpt[key]
        if isinstance(sd, nn.Module):
            sd = sd.state_dict()
        if not _is_state_dict(sd):
            raise ValueError(f"checkpoint[{key!r}] is not a state dict (name -> tensor)")
        return dict(sd), key
    if _is_state_dict(ckpt):
        return dict(ckpt), None
    if isinstance(ckpt, dict):
        for k in _STATE_KEYS:
            if k in ckpt and _is_state_dict(ckpt[k]):
                return dict(ckpt[k]), k
    have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"no state dict found in the checkpoint (looked for {_STATE_KEYS}); it has {have}; pass key=")


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Remove DDP's ``module.`` and the DINO/iBOT wrapper's ``backbone.`` prefixes.  When the
    checkpoint holds a wrapper (backbone + projection head), keys outside ``backbone.`` belong to the
    projection head and are returned as ignored."""
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    ignored = []
    if any(k.startswith("backbone.") for k in out):
        backbone = {}
        for k, v in out.items():
            if k.startswith("backbone."):
                backbone[k[len("backbone."):]] = v
            else:
                ignored.append(k)
        out = backbone
    return out, ignored


def load_checkpoint(
    model: MaskedViT,
    path: Union[str, os.PathLike],
    key: Optional[str] = None,
    *,
    strict: bool = True,
) -> CheckpointReport:
    """Load a local checkpoint into ``model`` (a ``MaskedViT``; a plain timm ViT is converted first).

    Understands timm state dicts (``.pth``/``.bin``/``.safetensors``), DeiT/MAE (``model``), DINO/iBOT
    (``teacher``/``student``, with ``module.`` and ``backbone.`` prefixes; their projection-head keys
    are skipped and reported; iBOT's ``masked_embed`` becomes ``mask_token``), MAE (its ``decoder*``
    keys and decoder-width mask token are skipped and reported) and the training driver's own
    ``checkpoint.pt`` (the student's backbone; ``key="teacher"`` for the teacher).
    ``key`` picks the entry of the checkpoint dict explicitly.  ``pos_embed`` is resampled when the
    checkpoint's patch grid differs.  A classifier head whose shape differs from the model's is
    skipped and reported.  With ``strict`` (default) any other missing or unexpected key is a
    ``ValueError``.  A missing file is a ``FileNotFoundError``; nothing is downloaded.
    """
    if not isinstance(model, MaskedViT):
        model = convert_timm_vit(model)
    ckpt = _read_file(path)
    sd, source_key = _select_state_dict(ckpt, key)
    sd, ignored = _strip_prefixes(sd)

    # iBOT names its mask token masked_embed ([1, D]).
    if "masked_embed" in sd and "mask_token" not in sd:
        sd["mask_token"] = sd.pop("masked_embed").reshape(1, 1, -1)

    own = model.state_dict()
    resized = []
    if "pos_embed" in sd and model.pos_embed is not None and sd["pos_embed"].shape != own["pos_embed"].shape:
        src = sd["pos_embed"]
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        n_src = src.shape[1] - prefix
        side = int(round(n_src ** 0.5))
        if src.dim() != 3 or src.shape[-1] != own["pos_embed"].shape[-1] or side * side != n_src:
            raise ValueError(
                f"pos_embed in the checkpoint has shape {tuple(src.shape)}; cannot resample it to "
                f"{tuple(own['pos_embed'].shape)} (needs the same width and a square grid after {prefix} prefix tokens)"
            )
        sd["pos_embed"] = resample_abs_pos_embed(
            src, new_size=list(model.grid_size), old_size=[side, side], num_prefix_tokens=prefix
        )
        resized.append("pos_embed")

    for k in list(sd):
        if k.startswith(_DECODER_PREFIXES):
            ignored.append(k)  # an MAE-style pixel decoder, not part of the encoder
            del sd[k]
        elif k.startswith(("head.", "head_dist.", "mask_token")):
            # A classifier for other classes, a projection head, or a decoder-width mask token (MAE).
            if k not in own or own[k].shape != sd[k].shape:
                ignored.append(k)
                del sd[k]
        elif k in own and own[k].shape != sd[k].shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} does not match the model's {tuple(own[k].shape)}")

    result = model.load_state_dict(sd, strict=False)
    missing = list(result.missing_keys)
    unexpected = list(result.unexpected_keys)
    if strict:
        bad_missing = [k for k in missing if not k.startswith(_OPTIONAL_PREFIXES)]
        if bad_missing or unexpected:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} does not match the model: missing {bad_missing[:8]}"
                f"{' ...' if len(bad_missing) > 8 else ''}, unexpected {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''} (load_checkpoint(..., strict=False) to load what fits)"
            )
    report = CheckpointReport(source_key, missing, unexpected, sorted(ignored), resized)
    _logger.info(
        "loaded %s%s: %d tensors; missing %s; ignored %d head keys; resized %s",
        os.fspath(path), f"[{source_key}]" if source_key else "", len(sd), missing, len(ignored), resized,
    )
    return report
