"""Models by timm name (create_vit, MaskedViT, recipes, the analysis loader) and local checkpoints by path.

Nothing can be downloaded here: every model is randomly initialised by timm and every checkpoint is
written by the test itself in the layout the real files have.
"""
import copy

import pytest
import timm
import torch

from fastmask.models import MaskedViT, MaskedViTDistilled, create_vit, load_checkpoint
from fastmask.models.vit import vit_names

SMALL = dict(img_size=32, patch_size=8, depth=1)

# One name per family the issue asks for; each runs in well under a second at depth 1 / 32 px.
NAMES = [
    "vit_small_patch16_224",
    "vit_tiny_patch16_224.augreg_in21k",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch32_clip_quickgelu_224",
    "vit_small_patch16_224.dino",
]


def _randomise_prefix(model):
    with torch.no_grad():  # timm starts CLS/registers near zero; make them matter in comparisons
        for name in ("cls_token", "reg_token", "dist_token"):
            p = getattr(model, name, None)
            if p is not None:
                p.normal_()


@pytest.mark.parametrize("name", NAMES)
def test_create_vit_by_timm_name_matches_timm(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=4, **SMALL).eval()
    _randomise_prefix(ref)
    model = create_vit(name, num_classes=4, **SMALL).eval()
    assert isinstance(model, MaskedViT)
    assert isinstance(model, MaskedViTDistilled) == ("distilled" in name)
    assert set(model.state_dict()) == set(ref.state_dict()) | {"mask_token"}
    model.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        got, cls_attn = model(x, return_cls_attn=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert cls_attn.shape == (2, 16)
    assert torch.isfinite(cls_attn).all() and (cls_attn >= 0).all()


def test_maskedvit_takes_a_timm_name():
    m = MaskedViT("vit_small_patch16_224", **SMALL)
    assert type(m) is MaskedViT and m.head.out_features == 1000  # timm's default, as timm.create_model
    assert m.embed_dim == 384 and m.patch_size == (8, 8)
    d = MaskedViT("deit_tiny_distilled_patch16_224", num_classes=3, **SMALL)
    assert isinstance(d, MaskedViTDistilled) and d.num_prefix_tokens == 2
    assert type(copy.deepcopy(d)) is type(d)  # deepcopy/pickle go through __new__ without a name
    r = MaskedViT("vit_small_patch14_reg4_dinov2", num_classes=0, **SMALL)
    assert r.num_prefix_tokens == 5 and r.blocks[0].ls1.gamma.shape == (384,)
    with pytest.raises(TypeError, match="by keyword"):
        MaskedViT("vit_small_patch16_224", 32)
    with pytest.raises(TypeError, match="not a MaskedViTDistilled"):
        MaskedViTDistilled("vit_small_patch16_224", **SMALL)


def test_unknown_names_list_the_closest_valid_ones():
    with pytest.raises(ValueError, match=r"unknown ViT 'vit_smal_patch14_dinov2'; closest valid names: vit_small_patch14_dinov2"):
        create_vit("vit_smal_patch14_dinov2")
    with pytest.raises(ValueError, match=r"closest valid names: .*deit3_small_patch16_224"):
        MaskedViT("deit3_smal_patch16_224")
    with pytest.raises(ValueError, match="'resnet50' .*is not a VisionTransformer"):
        create_vit("resnet50")
    with pytest.raises(ValueError, match="class token"):
        create_vit("vit_base_patch16_siglip_224", **SMALL)  # map pooling, no CLS token
    with pytest.raises(ValueError, match="never downloads"):
        create_vit("vit_small_patch14_dinov2", pretrained=True)
    with pytest.raises(ValueError, match="no distillation token"):
        create_vit("deit_tiny_patch16_224", distilled=True, **SMALL)
    names = vit_names()
    assert {"vit_tiny", "vit_small_patch14_dinov2", "deit3_base_patch16_224", "vit_base_patch16_clip_224"} <= set(names)


def _save(obj, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("layout", ["timm.pth", "timm.safetensors", "dino.pth", "ibot.pth", "deit.pth"])
def test_create_vit_loads_local_checkpoints_by_path(tmp_path, layout):
    torch.manual_seed(1)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **SMALL).eval()
    _randomise_prefix(src)
    sd = src.state_dict()
    kind, ext = layout.split(".")
    path = tmp_path / f"weights.{ext}"
    key = None
    if kind == "timm":
        _save(sd, path)
    elif kind == "dino":  # DINO: {'teacher': {'module.backbone.*', 'module.head.*'}, 'args': Namespace}
        import argparse

        teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
        teacher["module.head.mlp.0.weight"] = torch.randn(8, 384)
        _save({"teacher": teacher, "student": teacher, "args": argparse.Namespace(arch="vit_small")}, path)
        key = "teacher"
    elif kind == "ibot":  # iBOT: masked_embed [1, D] next to the backbone
        state = {f"backbone.{k}": v for k, v in sd.items()}
        state["backbone.masked_embed"] = torch.randn(1, 384)
        _save({"teacher": state}, path)
    else:  # DeiT/MAE: {'model': state dict}
        _save({"model": sd}, path)
    model = create_vit("vit_small_patch14_dinov2", checkpoint=path, checkpoint_key=key, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=1e-4, atol=1e-5)
    if kind == "ibot":
        assert model.mask_token.abs().sum() > 0


def test_recipe_and_analysis_loader_take_timm_names(tmp_path):
    from fastmask.analysis.loading import load_vit_for_analysis
    from fastmask.config import load_config
    from fastmask.methods.base import build_backbone

    cfg = load_config(overrides=["model.arch=deit3_small_patch16_224", "model.patch_size=16", "model.img_size=32",
                             "model.depth=1"])
    backbone = build_backbone(cfg)
    assert isinstance(backbone, MaskedViT) and backbone.no_embed_class and backbone.blocks[0].ls1.gamma.numel() == 384

    torch.manual_seed(2)
    src = timm.create_model("vit_base_patch32_clip_quickgelu_224", pretrained=False, num_classes=0,
                            img_size=64, patch_size=16, depth=1).eval()
    path = tmp_path / "clip.safetensors"
    _save(src.state_dict(), path)
    # QuickGELU cannot be read off the shapes: the name fixes it.
    model, info = load_vit_for_analysis(str(path), arch="vit_base_patch32_clip_quickgelu_224",
                                        model_kwargs=dict(depth=1, patch_size=16))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=1e-4, atol=1e-5)
    assert info["img_size"] == 64 and info["embed_dim"] == 768


def test_config_catches_a_patch_size_the_name_contradicts():
    from fastmask.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.patch_size: 16 differs from the patch size 14 .*set model.patch_size=14"):
        load_config(overrides=["model.arch=vit_small_patch14_dinov2", "model.patch_size=16"])
    cfg = load_config(overrides=["model.arch=vit_small_patch14_dinov2", "model.patch_size=14", "model.img_size=28",
                                 "data.image_size=28", "data.local_size=14"])
    assert cfg.model.arch == "vit_small_patch14_dinov2"
