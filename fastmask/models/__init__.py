"""ViTs with token dropping, mask tokens and the CLS attention map; heads; multi-crop wrapper.

``create_vit("vit_small", patch_size=16, img_size=224)`` or ``create_vit("vit_small_patch14_dinov2",
checkpoint=path)`` (any timm ViT/DeiT name, ``vit_names()``) builds a ``MaskedViT`` (timm's
``VisionTransformer`` with ``fastmask.nn.Attention``); ``convert_timm_vit`` converts an existing timm
ViT in place; ``load_checkpoint`` loads local timm/DeiT/DINO/iBOT checkpoints.  See ``vit.py`` for the
forward contract and ``heads.py`` for the heads.
"""
from .heads import (
    ClassifierHead,
    DINOHead,
    IBOTHead,
    LinearDecoder,
    MultiCropOutput,
    MultiCropWrapper,
    TransformerDecoder,
    WeightNormLinear,
)
from .vit import (
    VIT_CONFIGS,
    CheckpointReport,
    MaskedViT,
    MaskedViTDistilled,
    ViTFeatures,
    convert_timm_vit,
    create_vit,
    load_checkpoint,
    vit_names,
)

__all__ = [
    "VIT_CONFIGS",
    "CheckpointReport",
    "ClassifierHead",
    "DINOHead",
    "IBOTHead",
    "LinearDecoder",
    "MaskedViT",
    "MaskedViTDistilled",
    "MultiCropOutput",
    "MultiCropWrapper",
    "TransformerDecoder",
    "ViTFeatures",
    "WeightNormLinear",
    "convert_timm_vit",
    "create_vit",
    "load_checkpoint",
    "vit_names",
]
