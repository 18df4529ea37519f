"""Projection, decoder and classifier heads, and the multi-crop wrapper.

* ``DINOHead``: MLP (3 layers, hidden 2048) -> 256-d bottleneck -> L2 normalisation -> weight-normalised
  linear layer to ``out_dim`` (65536) prototypes (Caron et al., 2021).  With ``norm_last_layer`` the
  weight norm's gain is fixed at 1 (the default DINO recipe for ViT-S/16).
* ``IBOTHead``: the same head applied to the CLS token and to every patch token, sharing the MLP;
  the patch tokens use the CLS prototypes (``shared_head``) or their own ``patch_out_dim`` layer (Zhou et al., 2022).
* ``LinearDecoder`` / ``TransformerDecoder``: map student tokens to the teacher's width (Masked Distillation).
* ``ClassifierHead``: (optional norm) + linear classifier, e.g. for linear probing.
* ``MultiCropWrapper``: runs the crops of one resolution as one batch through the backbone, then the
  head once on every crop's CLS features.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from ..nn import Block

__all__ = [
    "ClassifierHead",
    "DINOHead",
    "IBOTHead",
    "LinearDecoder",
    "MultiCropOutput",
    "MultiCropWrapper",
    "TransformerDecoder",
    "WeightNormLinear",
]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _init_linear(m: nn.Module) -> None:
    # DINO/iBOT initialisation of the projection MLP.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``W = g * V / ||V||`` per output row.

    The parameters are called ``weight_g`` [out, 1] and ``weight_v`` [out, in], the names of
    ``torch.nn.utils.weight_norm`` that DINO and iBOT checkpoints use, so their heads load as they
    are.  ``fix_gain`` freezes ``g`` at 1 (DINO's ``norm_last_layer``): the layer then computes cosine
    similarities with the prototypes.  The normalisation is explicit (no parametrisation hook), so it
    behaves the same under AMP, FSDP and ``torch.compile``.
    """

    def __init__(self, in_features: int, out_features: int, *, fix_gain: bool = True) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_gain)
        # nn.Linear's default initialisation (only the direction of each row matters).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return self.weight_g * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fix_gain={not self.weight_g.requires_grad}"


def _projection_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: List[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
    for _ in range(nlayers - 2):
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
    return nn.Sequential(*layers)


def _apply_tokenwise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The MLP may hold BatchNorm1d, which wants [M, C]: flatten any leading token dims.
    lead = x.shape[:-1]
    return module(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


class DINOHead(nn.Module):
    """DINO projection head: MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes.

    in_dim: backbone width; out_dim: prototypes (65536); nlayers: MLP layers (3); hidden_dim: 2048;
    bottleneck_dim: 256; use_bn: BatchNorm in the MLP (off for ViTs); norm_last_layer: fix the weight
    norm's gain at 1.  Input [..., in_dim] -> [..., out_dim].  The prototype layer is ``last_layer``
    (DINO freezes its gradient during the first epoch).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("nlayers", nlayers),
                            ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim)):
            _check_positive_int(name, value)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.bottleneck_dim, self.norm_last_layer = bottleneck_dim, norm_last_layer
        self.mlp = _projection_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(_init_linear)
        self.last_layer = self.prototypes(out_dim)

    def prototypes(self, num: int) -> WeightNormLinear:
        """A new weight-normalised prototype layer [bottleneck_dim -> num] (gain fixed with ``norm_last_layer``)."""
        return WeightNormLinear(self.bottleneck_dim, num, fix_gain=self.norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck embedding [..., bottleneck_dim]."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"the head expects features of width in_dim={self.in_dim}, got shape {tuple(x.shape)}")
        return F.normalize(_apply_tokenwise(self.mlp, x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))


class IBOTHead(DINOHead):
    """iBOT head: one MLP for the CLS token and the patch tokens.

    The CLS embedding goes to ``last_layer`` (``out_dim`` prototypes); the patch embeddings go to the
    same layer when ``shared_head`` and ``patch_out_dim == out_dim``, otherwise to their own
    ``last_layer2`` with ``patch_out_dim`` prototypes.  ``forward(cls [B, D], patch [B, N, D] or None)``
    returns ``(cls_out [B, out_dim], patch_out [B, N, patch_out_dim] or None)``.
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, patch_out_dim: Optional[int] = None, *,
                 shared_head: bool = True, **head_options) -> None:
        """``head_options``: ``DINOHead``'s (``use_bn``, ``norm_last_layer``, ``nlayers``, ``hidden_dim``,
        ``bottleneck_dim``), for the shared MLP and both prototype layers."""
        super().__init__(in_dim, out_dim, **head_options)
        patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        _check_positive_int("patch_out_dim", patch_out_dim)
        self.patch_out_dim = patch_out_dim
        self.last_layer2 = None if shared_head and patch_out_dim == out_dim else self.prototypes(patch_out_dim)

    def forward_cls(self, cls: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(cls))

    def forward_patch(self, patch: torch.Tensor) -> torch.Tensor:
        layer = self.last_layer if self.last_layer2 is None else self.last_layer2
        return layer(self.project(patch))

    def forward(
        self, cls: torch.Tensor, patch: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.forward_cls(cls), None if patch is None else self.forward_patch(patch)


class LinearDecoder(nn.Module):
    """Token-wise linear map from the student's width to the teacher's (Masked Distillation's
    simplest decoder): [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        _check_positive_int("in_dim", in_dim)
        _check_positive_int("out_dim", out_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        _init_linear(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TransformerDecoder(nn.Module):
    """A small ViT decoder: linear to ``embed_dim``, ``depth`` pre-norm blocks (fastmask attention),
    LayerNorm, linear to ``out_dim``.  Input tokens [B, L, in_dim] (positions already in them, e.g. a
    student's output including mask tokens) -> [B, L, out_dim]."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        embed_dim: Optional[int] = None,
        depth: int = 2,
        num_heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dim = in_dim if embed_dim is None else embed_dim
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("embed_dim", embed_dim), ("depth", depth)):
            _check_positive_int(name, value)
        num_heads = max(1, embed_dim // 64) if num_heads is None else num_heads
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed = nn.Linear(in_dim, embed_dim)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r) for r in rates
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be tokens [B, L, in_dim], got shape {tuple(x.shape)}")
        return self.head(self.norm(self.blocks(self.embed(x))))


class ClassifierHead(nn.Module):
    """Linear classifier on pooled features [B, in_dim] -> [B, num_classes].

    norm: ``"none"``, ``"layernorm"`` or ``"batchnorm"`` (BatchNorm without affine parameters, as in
    MAE's linear probe) before the linear layer; dropout before it too.
    """

    NORMS = ("none", "layernorm", "batchnorm")

    def __init__(self, in_dim: int, num_classes: int, *, norm: str = "none", dropout: float = 0.0) -> None:
        super().__init__()
        _check_positive_int("in_dim", in_dim)
        _check_positive_int("num_classes", num_classes)
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {self.NORMS}, got {norm!r}")
        if norm == "layernorm":
            self.norm = nn.LayerNorm(in_dim)
        elif norm == "batchnorm":
            self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        else:
            self.norm = nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"x must be pooled features [B, in_dim], got shape {tuple(x.shape)}")
        return self.linear(self.drop(self.norm(x)))


# ----------------------------------------------------------------------------------------------
# multi-crop
# ----------------------------------------------------------------------------------------------

class MultiCropOutput(NamedTuple):
    """What ``MultiCropWrapper`` returns; batch rows follow the order of the crops.

    cls:      head output for every crop's CLS token, concatenated [sum_i B_i, out_dim]
    features: the backbone's CLS features, concatenated [sum_i B_i, D]
    patch:    per crop, the head's patch output [B_i, N_i or K_i, patch_out_dim] (with ``return_patch``; with
              ``head_on_patch=False`` the backbone's patch tokens [B_i, N_i or K_i, D]), else None
    cls_attn: per crop, the CLS map [B_i, N_i or K_i] (with ``return_cls_attn``), else None
    """

    cls: torch.Tensor
    features: torch.Tensor
    patch: Optional[List[torch.Tensor]]
    cls_attn: Optional[List[torch.Tensor]]


OptionalPerCrop = Optional[Sequence[Optional[torch.Tensor]]]


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops, as in DINO and iBOT.

    Consecutive crops of one resolution run through the backbone as one batch (grouped on the host
    from the crops' shapes: no tensor op, so a compiled step sees static groups), then the head
    runs once over all CLS features.  ``masks`` (per crop, e.g. for the two global crops only; None
    for the others) go to the backbone's mask-token path, ``ids_keep`` (per crop) to its token-drop
    path.  The backbone must have ``forward_features(x, ids_keep=, mask=, return_cls_attn=,
    attn_layer=) -> ViTFeatures`` (``MaskedViT``).  The head maps CLS features with ``forward_cls``
    if it has one (``IBOTHead``) or its ``forward``; with ``return_patch`` the patch tokens go through
    ``head.forward_patch`` (or its ``forward``), one crop group at a time; ``head_on_patch=False``
    returns the patch tokens instead, for a caller that runs the head on the few it needs (iBOT's
    masked tokens); ``head_on_cls=False`` leaves ``cls`` = the CLS features (for a loss fused with the
    head's last layer).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_features"):
            raise TypeError(f"backbone must have forward_features (a MaskedViT), got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = head

    def _head_cls(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.head, "forward_cls", None)
        return fn(x) if fn is not None else self.head(x)

    def _head_patch(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.head, "forward_patch", None)
        return fn(x) if fn is not None else self.head(x)

    @staticmethod
    def _per_crop(name: str, value: OptionalPerCrop, num_crops: int) -> List[Optional[torch.Tensor]]:
        if value is None:
            return [None] * num_crops
        if isinstance(value, torch.Tensor) or len(value) != num_crops:
            raise ValueError(f"{name} must be a list with one entry (a tensor or None) per crop ({num_crops})")
        return list(value)

    def _group_mask(self, crops, masks, start, end) -> Optional[torch.Tensor]:
        group = masks[start:end]
        if all(m is None for m in group):
            return None
        filled = []
        for crop, m in zip(crops[start:end], group):
            if m is None:  # an unmasked crop in a masked group: an all-False mask changes nothing
                h, w = self.backbone.grid_for(tuple(crop.shape[-2:]))
                m = torch.zeros(crop.shape[0], h * w, dtype=torch.bool, device=crop.device)
            filled.append(m)
        return torch.cat(filled)

    @staticmethod
    def _group_ids(ids_keep, start, end) -> Optional[torch.Tensor]:
        group = ids_keep[start:end]
        if all(i is None for i in group):
            return None
        if any(i is None for i in group) or len({i.shape[1] for i in group}) != 1:
            raise ValueError(
                "ids_keep: crops of one resolution run as one batch, so within crops "
                f"{start}..{end - 1} either none or all must keep tokens, all the same number per row"
            )
        return torch.cat(list(group))

    def forward(
        self,
        crops: Union[torch.Tensor, Sequence[torch.Tensor]],
        *,
        masks: OptionalPerCrop = None,
        ids_keep: OptionalPerCrop = None,
        return_patch: bool = False,
        head_on_patch: bool = True,
        head_on_cls: bool = True,
        return_cls_attn: bool = False,
        attn_layer: int = -1,
    ) -> MultiCropOutput:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not isinstance(crops, (list, tuple)) or len(crops) == 0 or not all(isinstance(c, torch.Tensor) for c in crops):
            raise TypeError("crops must be a non-empty list of image tensors [B_i, C, H_i, W_i]")
        for i, c in enumerate(crops):
            if c.dim() != 4:
                raise ValueError(f"crops[{i}] must be an image batch [B, C, H, W], got shape {tuple(c.shape)}")
        masks = self._per_crop("masks", masks, len(crops))
        ids_keep = self._per_crop("ids_keep", ids_keep, len(crops))

        ends = [i for i in range(1, len(crops)) if crops[i].shape[-2:] != crops[i - 1].shape[-2:]] + [len(crops)]

        features, patch_out, cls_maps = [], [], []
        start = 0
        for end in ends:
            x = torch.cat(list(crops[start:end]))
            feats = self.backbone.forward_features(
                x,
                ids_keep=self._group_ids(ids_keep, start, end),
                mask=self._group_mask(crops, masks, start, end),
                return_cls_attn=return_cls_attn,
                attn_layer=attn_layer,
            )
            split = [c.shape[0] for c in crops[start:end]]
            features.append(feats.cls)
            if return_patch:
                patch = self._head_patch(feats.patch) if head_on_patch else feats.patch
                patch_out.extend(torch.split(patch, split))
            if return_cls_attn:
                cls_maps.extend(torch.split(feats.cls_attn, split))
            start = end
        features = torch.cat(features)
        return MultiCropOutput(
            cls=self._head_cls(features) if head_on_cls else features,
            features=features,
            patch=patch_out if return_patch else None,
            cls_attn=cls_maps if return_cls_attn else None,
        )
