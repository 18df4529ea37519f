"""python -m fastmask.eval: k-NN + linear probe of frozen backbones (driver or timm checkpoints)."""
import json

import pytest
import timm
import torch

from fastmask.eval import backbone_features, linear_probe, main
from fastmask.models import create_vit
from test_export import driver_checkpoint


def test_linear_probe_learns_separable_features_and_sweeps_lrs():
    g = torch.Generator().manual_seed(123)  # not the probe's own seed (0): its init would be the centres
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 16, generator=g)
    res = linear_probe(x[:300], y[:300], x[300:], y[300:], 4, lrs=(1e-9, 0.1), epochs=20)
    assert set(res["per_lr"]) == {"1e-09", "0.1"} and res["best_lr"] == 0.1
    assert res["top1"] >= 95.0 and res["per_lr"]["1e-09"] < 60.0
    with pytest.raises(ValueError, match="positive lrs"):
        linear_probe(x, y, x, y, 4, lrs=(0.0,))


def test_multi_block_features_match_timm_intermediate_layers():
    model = create_vit("vit_tiny", patch_size=8, img_size=32, depth=3).eval()
    with torch.no_grad():
        model.cls_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    probe, knn = backbone_features(model, x, n_last_blocks=2, avgpool=True)
    ref = timm.models.vision_transformer.VisionTransformer.get_intermediate_layers(
        model, x, n=2, norm=True, return_prefix_tokens=True)
    expected = torch.cat([ref[0][1][:, 0], ref[1][1][:, 0], ref[1][0].mean(1)], dim=-1)
    torch.testing.assert_close(probe, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(knn, model.forward_features(x).cls)
    one, _ = backbone_features(model, x)
    torch.testing.assert_close(one, ref[1][1][:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_last_blocks"):
        backbone_features(model, x, n_last_blocks=4)


def test_cli_on_a_driver_checkpoint_is_above_chance(tmp_path, capsys):
    path, _ = driver_checkpoint(tmp_path)  # DINO tiny recipe, untrained: builtin:shapes, 10 classes
    out = tmp_path / "eval.json"
    assert main([str(path), "--out", str(out), "--num-workers", "0", "--epochs", "30",
                 "--features", "cls+avgpool"]) == 0
    res = json.loads(out.read_text())
    assert res["checkpoint"]["which"] == "teacher" and res["train_images"] == 1000 and res["val_images"] == 200
    assert res["feature_dim"] == 2 * 192 and res["image_size"] == 32
    # Chance is 10%; an untrained ViT's features already carry the shapes (README: k-NN 35.5%).
    assert res["knn"]["knn_top1"] > 2 * res["chance"]
    assert res["linear"]["top1"] > 2 * res["chance"] and len(res["linear"]["per_lr"]) == 4
    table = capsys.readouterr().out
    assert "k-NN (k=20, T=0.07)" in table and "linear (cls+avgpool, 1 block(s))" in table


def test_cli_on_a_timm_safetensors_file(tmp_path, capsys):
    from safetensors.torch import save_file

    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, depth=1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert main([str(tmp_path / "w.safetensors"), "--arch", "vit_small_patch14_dinov2", "--data", "builtin:shapes",
                 "--num-workers", "0", "--no-linear", "--max-train", "300"]) == 0
    assert "k-NN" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_online_linear_probe_in_the_driver_evaluation(tmp_path):
    from fastmask.config import load_config
    from fastmask.engine.evaluation import evaluate
    from fastmask.methods import get_method

    cfg = load_config(config="dino_tiny_builtin", overrides=[
        "linear_probe_epochs=10", "attn_images=0", "data.num_workers=0", "knn_max_train=500", "model.depth=1"])
    method = get_method("dino")(cfg, 10)
    res = evaluate(cfg, method, device=torch.device("cpu"), amp_dtype=None, num_classes=10, out_dir=str(tmp_path),
                   epoch=0)
    assert res["linear_top1"] > 20.0 and res["linear_best_lr"] in (0.001, 0.01, 0.1, 1.0) and "knn_top1" in res
    off = load_config(config="dino_tiny_builtin", overrides=["attn_images=0", "data.num_workers=0", "knn_max_train=500",
                                                              "model.depth=1"])
    assert "linear_top1" not in evaluate(off, method, device=torch.device("cpu"), amp_dtype=None, num_classes=10,
                                         out_dir=str(tmp_path), epoch=0)
