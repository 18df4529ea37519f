"""python -m fastmask.export: driver checkpoints -> timm safetensors that plain timm loads, outputs equal."""
import argparse
import json

import pytest
import timm
import torch

from fastmask.export import export_timm, load_backbone, main, timm_model_args
from fastmask.models import create_vit


def driver_checkpoint(tmp_path, recipe="dino_tiny_builtin", overrides=(), num_classes=0):
    """A driver checkpoint.pt as the training loop writes it (config + method state), untrained."""
    from fastmask.config import config_to_dict, load_config
    from fastmask.methods import get_method

    cfg = load_config(config=recipe, overrides=list(overrides))
    torch.manual_seed(0)
    method = get_method(cfg.method_name)(cfg, num_classes)
    with torch.no_grad():  # make the teacher differ from the student
        for p in method.state_dict(keep_vars=True).values():
            if p.dtype.is_floating_point:
                p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "checkpoint.pt"
    torch.save({"method": method.state_dict(), "config": config_to_dict(cfg), "step": 7}, path)
    return path, method


def _timm_load(out, meta, **extra):
    # Exactly what the issue asks timm users to write (num_classes=0 backbones need nothing more).
    return timm.create_model(meta["name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out), **extra),
                             **meta["model_args"]).eval()


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_dino_backbone_round_trips_through_timm(tmp_path, which):
    path, method = driver_checkpoint(tmp_path)
    out = tmp_path / f"{which}.safetensors"
    assert main([str(path), "--which", which, "--out", str(out)]) == 0
    meta = json.loads((tmp_path / f"{which}.safetensors.json").read_text())
    assert meta["name"] == "vit_tiny_patch16_224" and meta["model_args"]["patch_size"] == method.student.backbone.patch_size[0]
    assert meta["pretrained_cfg"]["input_size"][1:] == [meta["model_args"]["img_size"]] * 2
    ref = _timm_load(out, meta)
    ours = getattr(method, which).backbone.eval()
    img = meta["model_args"]["img_size"]
    x = torch.randn(3, 3, img, img)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)
        other = (method.student if which == "teacher" else method.teacher).backbone.eval()
        assert not torch.allclose(ref(x), other(x), atol=1e-4)  # the right network was exported
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert "mask_token" not in f.keys() and json.loads(f.metadata()["fastmask"])["name"] == meta["name"]


def test_default_is_the_evaluated_network_and_supervised_head_is_kept(tmp_path):
    path, method = driver_checkpoint(tmp_path, "masksub_tiny_builtin", num_classes=10)
    model, info = load_backbone(str(path))
    assert info["which"] == "student" and model.num_classes == 10
    meta = export_timm(model, str(tmp_path / "m.safetensors"), info=info)
    assert meta["max_abs_diff"] < 1e-5
    ref = _timm_load(tmp_path / "m.safetensors", meta, num_classes=10)
    x = torch.randn(2, 3, meta["model_args"]["img_size"], meta["model_args"]["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ref(x), method.student.eval()(x), rtol=1e-5, atol=1e-5)
    dpath, _ = driver_checkpoint(tmp_path, "dino_tiny_builtin")
    assert load_backbone(str(dpath))[1]["which"] == "teacher"


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "deit3_small_patch16_224",
                                  "deit_tiny_distilled_patch16_224", "vit_base_patch32_clip_quickgelu_224"])
def test_timm_named_models_export_under_their_name(tmp_path, name):
    torch.manual_seed(0)
    model = create_vit(name, img_size=32, patch_size=8, depth=1).eval()
    with torch.no_grad():
        model.cls_token.normal_()
    meta = export_timm(model, str(tmp_path / "w.safetensors"), name=name)
    assert meta["name"] == name and meta["max_abs_diff"] < 1e-5
    ref = _timm_load(tmp_path / "w.safetensors", meta)
    assert type(ref) is type(timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), rtol=1e-5, atol=1e-5)


def test_dino_file_entries_and_bad_input(tmp_path, capsys):
    torch.manual_seed(0)
    src = create_vit("vit_tiny", patch_size=8, img_size=32, depth=2).eval()
    sd = {f"module.backbone.{k}": v for k, v in src.state_dict().items() if k != "mask_token"}
    sd["module.head.last_layer.weight"] = torch.randn(4, 192)
    path = tmp_path / "dino.pth"
    torch.save({"teacher": sd, "student": sd, "args": argparse.Namespace(arch="vit_tiny")}, path)
    model, info = load_backbone(str(path), "teacher")
    assert info["which"] == "teacher"
    assert timm_model_args(model)["depth"] == 2
    assert main([str(path), "--which", "student", "--out", str(tmp_path / "s.safetensors")]) == 0
    assert main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(path), "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
