"""python -m fastmask.attention_maps: per-head / head-mean CLS maps (fused path, no [B,H,L,L]),
DINO thresholding, AttMask masks, PNGs written and opened."""
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmask import ops
from fastmask.analysis.capture import attention_matrix
from fastmask.attention_maps import attention_and_masks, cls_attention_per_head, keep_top_mass, main
from fastmask.models import create_vit
from test_export import driver_checkpoint


def _model(**kw):
    torch.manual_seed(0)
    m = create_vit("vit_tiny", patch_size=8, img_size=40, depth=2, embed_dim=48, num_heads=3, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # peaky attention, so heads differ
    return m


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("kw", [{}, dict(qk_norm=True, reg_tokens=2), dict(distilled=True)])
def test_per_head_rows_are_the_attention_rows_and_average_to_the_fused_map(kw):
    model = _model(**kw)
    x = torch.randn(2, 3, 40, 40)  # 5x5 = 25 patches, L = 25 + prefix
    captured = []
    h = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    mean, heads = cls_attention_per_head(model, x, layer=0)
    h.remove()
    P = model.num_prefix_tokens
    full = attention_matrix(model.blocks[0].attn, captured[0])  # explicit [B, H, L, L], the specification
    torch.testing.assert_close(heads, full[:, :, 0, P:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heads.mean(1), mean, rtol=1e-4, atol=1e-6)
    assert heads.shape == (2, 3, 25) and mean.dtype == torch.float32
    assert not torch.allclose(heads[:, 0], heads[:, 1])


def test_no_full_attention_matrix_is_built():
    model = _model()
    x = torch.randn(2, 3, 40, 40)
    L = 26
    with _Shapes() as rec:
        attention_and_masks(model, x, threshold=0.6)
    assert rec.shapes and not [s for s in rec.shapes if len(s) == 4 and s[-2:] == (L, L)]
    assert (2, 3, 1, L) in rec.shapes  # the query-0 rows


def test_keep_top_mass_is_the_smallest_set_holding_the_mass():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 3, 37, generator=g) ** 4
    for mass in (0.1, 0.6, 1.0):
        keep = keep_top_mass(maps, mass)
        total = maps.sum(-1)
        kept = (maps * keep).sum(-1)
        assert (kept >= mass * total - 1e-6).all()
        # Minimal: dropping the smallest kept value falls below the mass; every kept value >= every dropped one.
        smallest = torch.where(keep, maps, torch.full_like(maps, float("inf"))).amin(-1)
        assert (kept - smallest < mass * total + 1e-6).all()
        largest_dropped = torch.where(keep, torch.full_like(maps, -1.0), maps).amax(-1)
        assert (smallest >= largest_dropped).all()
    with pytest.raises(ValueError, match="threshold"):
        keep_top_mass(maps, 0.0)


def test_masks_are_the_ops_attmask_masks():
    model = _model()
    x = torch.randn(3, 3, 40, 40)
    out = attention_and_masks(model, x, mask_ratio=0.4, show_max=0.2, show_ratio=0.08, seed=5)
    for mode in ("high", "low", "hint"):
        expected = ops.cls_attention_mask(out["mean"], 0.4, mode=mode, show_max=0.2,
                                          show_ratio=0.08 if mode == "hint" else None, seed=5)
        assert torch.equal(out[f"mask_{mode}"], expected)
    assert (out["mask_high"].sum(1) == 10).all() and (out["mask_hint"].sum(1) == 8).all()
    top = out["mean"].argmax(1)
    assert out["mask_high"][torch.arange(3), top].all() and not out["mask_low"][torch.arange(3), top].any()


def test_cli_writes_pngs_that_open(tmp_path, capsys):
    from PIL import Image

    path, _ = driver_checkpoint(tmp_path)  # DINO tiny: 4 blocks, 3 heads, patch 8
    out = tmp_path / "maps"
    assert main([str(path), "--data", "builtin:shapes", "--num-images", "2", "--image-size", "48",
                 "--threshold", "0.6", "--out", str(out)]) == 0
    index = json.loads((out / "attention_maps.json").read_text())
    assert len(index["files"]) == 2 and index["heads"] == 3 and index["grid"] == [6, 6] and index["layer"] == 3
    for f in index["files"]:
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert arr.shape[0] > 300 and arr.shape[1] > 600 and arr.std() > 10  # a real figure, not blank

    img = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(img)
    assert main([str(path), "--images", str(img), "--out", str(tmp_path / "m2")]) == 0
    assert (tmp_path / "m2" / "attn_000_photo.png").is_file()
    assert main([str(path), "--images", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "m3")]) == 2
    assert "image not found" in capsys.readouterr().err
