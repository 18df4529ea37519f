"""MaskedViT (token drop, mask tokens, CLS map) against plain timm ViTs; conversion; checkpoints; heads."""
import argparse
import copy

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from fastmask import ops
from fastmask.models import (
    ClassifierHead,
    DINOHead,
    IBOTHead,
    LinearDecoder,
    MaskedViT,
    MaskedViTDistilled,
    MultiCropWrapper,
    TransformerDecoder,
    ViTFeatures,
    WeightNormLinear,
    convert_timm_vit,
    create_vit,
    load_checkpoint,
)
from fastmask.nn import Attention

DIM, DEPTH, HEADS, IMG, PATCH = 48, 2, 3, 32, 8
N = (IMG // PATCH) ** 2

# timm constructor options covering the prefix layouts a ViT can have.
LAYOUTS = {
    "cls": ("vit_tiny_patch16_224", {}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=2)),
    "no-embed-class": ("vit_tiny_patch16_224", dict(no_embed_class=True, global_pool="avg")),
}


def tiny_timm(layout="cls", num_classes=5, seed=0, **kw):
    name, extra = LAYOUTS[layout]
    torch.manual_seed(seed)
    cfg = dict(pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
               num_classes=num_classes)
    cfg.update(extra)
    cfg.update(kw)
    model = timm.create_model(name, **cfg).eval()
    with torch.no_grad():  # timm starts CLS/registers near zero; make them matter in the comparisons
        for p in (model.cls_token, getattr(model, "reg_token", None), getattr(model, "dist_token", None)):
            if p is not None:
                p.normal_()
    return model


def pair(layout="cls", **kw):
    """(plain timm model, an identical copy converted to MaskedViT) with a non-trivial mask token."""
    ref = tiny_timm(layout, **kw)
    model = convert_timm_vit(copy.deepcopy(ref))
    with torch.no_grad():
        model.mask_token.normal_()
    return ref, model


def tiny_vit(**kw):
    cfg = dict(patch_size=PATCH, img_size=IMG, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    cfg.update(kw)
    return create_vit("vit_tiny", **cfg).eval()


def random_ids(B, n, k, generator, sort=True):
    ids = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(B)])
    return ids.sort(dim=1).values if sort else ids


def timm_reference_tokens(ref, x, mask=None, mask_token=None):
    """timm's own embedding path, with explicit mask-token replacement before the positions."""
    tokens = ref.patch_embed(x)
    if mask is not None:
        tokens = torch.where(mask[..., None], mask_token.reshape(1, 1, -1), tokens)
    return ref._pos_embed(tokens)


def timm_reference_run(ref, seq):
    return ref.norm(ref.blocks(seq))


# ----------------------------------------------------------------------------------------------
# token drop, mask tokens, CLS map
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("K", [1, 7, N - 1, N])
def test_ids_keep_equals_timm_on_explicitly_gathered_tokens(layout, K):
    ref, model = pair(layout)
    g = torch.Generator().manual_seed(K)
    B = 3
    x = torch.randn(B, 3, IMG, IMG, generator=g)
    ids = random_ids(B, N, K, g, sort=(K != 7))  # unsorted rows must work too
    P = model.num_prefix_tokens

    full = timm_reference_tokens(ref, x)
    full_ids = torch.cat([torch.arange(P).expand(B, P), ids + P], dim=1)
    expected = timm_reference_run(ref, torch.gather(full, 1, full_ids[..., None].expand(-1, -1, DIM)))

    feats = model.forward_features(x, ids_keep=ids)
    assert isinstance(feats, ViTFeatures)
    assert feats.patch.shape == (B, K, DIM) and feats.prefix.shape == (B, P, DIM) and feats.cls_attn is None
    torch.testing.assert_close(feats.cls, expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.prefix, expected[:, :P], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.patch, expected[:, P:], rtol=1e-5, atol=1e-5)

    # The documented full-sequence path (MaskedKD's teacher) gives the same tokens.
    seq = ops.gather_tokens(model.embed(x), full_ids)
    torch.testing.assert_close(model.forward_features_from_tokens(seq).patch, feats.patch, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.forward_from_tokens(seq), model(x, ids_keep=ids), rtol=1e-6, atol=1e-6)


def test_ids_keep_gradients_match_timm_reference():
    ref, model = pair("cls")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    ids = random_ids(2, N, 6, g)
    full_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids + 1], dim=1)
    expected = timm_reference_run(ref, torch.gather(timm_reference_tokens(ref, x), 1, full_ids[..., None].expand(-1, -1, DIM)))
    out = model.forward_features(x, ids_keep=ids)
    w = torch.randn_like(expected)
    (expected * w).sum().backward()
    (torch.cat([out.prefix, out.patch], 1) * w).sum().backward()
    for name in ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, ref.get_parameter(name).grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["cls", "deit-distilled", "no-embed-class"])
def test_mask_path_equals_explicit_replacement_before_positions(layout):
    ref, model = pair(layout)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, IMG, IMG, generator=g)
    mask = torch.rand(3, N, generator=g) < 0.4
    mask[0] = False
    mask[1] = True
    P = model.num_prefix_tokens
    seq = timm_reference_tokens(ref, x, mask, model.mask_token.detach())
    expected = timm_reference_run(ref, seq)
    feats = model.forward_features(x, mask=mask)
    torch.testing.assert_close(feats.patch, expected[:, P:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.cls, expected[:, 0], rtol=1e-5, atol=1e-5)
    # The mask token gets gradient only through masked positions.
    feats.patch.sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    model.mask_token.grad = None
    model.forward_features(x, mask=torch.zeros_like(mask)).patch.sum().backward()
    assert model.mask_token.grad is None or model.mask_token.grad.abs().sum() == 0
    # Without a mask the token stays in the graph with an exactly zero gradient (DDP-friendly).
    model.mask_token.grad = None
    model.forward_features(x).patch.sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() == 0


def test_mask_and_ids_keep_together_mask_first_then_drop():
    ref, model = pair("cls")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    mask = torch.rand(2, N, generator=g) < 0.5
    ids = random_ids(2, N, 9, g)
    seq = timm_reference_tokens(ref, x, mask, model.mask_token.detach())
    full_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids + 1], dim=1)
    expected = timm_reference_run(ref, torch.gather(seq, 1, full_ids[..., None].expand(-1, -1, DIM)))
    torch.testing.assert_close(model.forward_features(x, mask=mask, ids_keep=ids).patch, expected[:, 1:], rtol=1e-5, atol=1e-5)


def _cls_map_by_hand(model, x, layer, **fwd):
    """The head-mean CLS row of block ``layer``'s attention, from the block input captured by a hook
    and explicit softmax with the block's weights."""
    captured = {}
    blk = model.blocks[layer]
    handle = blk.attn.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model.forward_features(x, **fwd)
    handle.remove()
    a, h = captured["x"], blk.attn
    B, L, _ = a.shape
    qkv = (a @ h.qkv.weight.T + h.qkv.bias).reshape(B, L, 3, h.num_heads, h.head_dim).permute(2, 0, 3, 1, 4)
    probs = torch.softmax((qkv[0] @ qkv[1].transpose(-2, -1)).double() * h.scale, dim=-1)
    return probs[:, :, 0, model.num_prefix_tokens:].mean(1)


@pytest.mark.parametrize("layout", ["cls", "deit-distilled"])
@pytest.mark.parametrize("attn_layer", [-1, 0])
@pytest.mark.parametrize("drop", [False, True])
def test_cls_map_equals_explicit_attention_of_that_layer(layout, attn_layer, drop):
    _, model = pair(layout)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    fwd = dict(ids_keep=random_ids(2, N, 5, g)) if drop else {}
    feats = model.forward_features(x, return_cls_attn=True, attn_layer=attn_layer, **fwd)
    expected = _cls_map_by_hand(model, x, attn_layer, **fwd)
    assert feats.cls_attn.dtype == torch.float32 and not feats.cls_attn.requires_grad
    assert feats.cls_attn.shape == feats.patch.shape[:2]
    torch.testing.assert_close(feats.cls_attn.double(), expected, rtol=1e-5, atol=1e-6)
    # forward returns (logits, cls_attn); the map is a return value, no module keeps it.
    logits, cls_attn = model(x, return_cls_attn=True, attn_layer=attn_layer, **fwd)
    torch.testing.assert_close(cls_attn, feats.cls_attn)
    torch.testing.assert_close(logits, model.classify(feats))
    assert not any(hasattr(m, "cls_attn") for m in model.modules())


def test_other_resolution_resamples_positions_like_timm_dynamic_size():
    torch.manual_seed(5)
    ref = tiny_timm("cls", dynamic_img_size=True)
    model = convert_timm_vit(tiny_timm("cls"))
    model.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 3, 48, 16)
    feats = model.forward_features(x, return_cls_attn=True)
    assert feats.patch.shape == (2, 12, DIM) and feats.cls_attn.shape == (2, 12)
    torch.testing.assert_close(torch.cat([feats.prefix, feats.patch], 1), ref.forward_features(x), rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_gives_same_outputs_and_grads():
    model = tiny_vit(num_classes=3)
    x = torch.randn(2, 3, IMG, IMG)
    ids = torch.tensor([[0, 2, 4, 9], [1, 3, 5, 15]])
    out, cls_attn = model(x, ids_keep=ids, return_cls_attn=True)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2, cls_attn2 = model(x, ids_keep=ids, return_cls_attn=True)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(cls_attn2, cls_attn)
    for a, b in zip(grads, [p.grad for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# construction and conversion
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dim,heads,depth", [("vit_tiny", 192, 3, 12), ("vit_small", 384, 6, 12),
                                                  ("vit_base", 768, 12, 12), ("vit_large", 1024, 16, 24)])
def test_create_vit_presets(name, dim, heads, depth):
    # depth=1 keeps construction cheap; the preset's depth is checked through VIT_CONFIGS.
    from fastmask.models import VIT_CONFIGS

    assert VIT_CONFIGS[name] == dict(embed_dim=dim, depth=depth, num_heads=heads)
    model = create_vit(name, patch_size=4, img_size=32, depth=1)
    assert isinstance(model, MaskedViT)
    assert model.embed_dim == dim and model.blocks[0].attn.num_heads == heads
    assert model.grid_size == (8, 8) and model.num_patches == 64 and model.num_prefix_tokens == 1
    assert model.mask_token.shape == (1, 1, dim) and type(model.blocks[0].attn) is Attention


def test_create_vit_timm_style_names_distilled_and_registers():
    m = create_vit("vit_tiny_patch8_32", depth=1, num_classes=4)
    assert m.patch_size == (8, 8) and m.grid_size == (4, 4) and m.head.out_features == 4
    d = create_vit("vit_tiny", patch_size=8, img_size=32, depth=1, num_classes=4, distilled=True)
    assert isinstance(d, MaskedViTDistilled) and d.num_prefix_tokens == 2
    assert d.blocks[0].attn.num_prefix_tokens == 2
    feats = d.forward_features(torch.randn(1, 3, 32, 32), return_cls_attn=True)
    assert feats.prefix.shape == (1, 2, 192) and feats.cls_attn.shape == (1, 16)
    r = create_vit("vit_tiny", patch_size=8, img_size=32, depth=1, reg_tokens=4)
    assert r.num_prefix_tokens == 5 and r.forward_features(torch.randn(1, 3, 32, 32)).prefix.shape == (1, 5, 192)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_timm_model_gives_same_logits(layout):
    ref = tiny_timm(layout)
    x = torch.randn(2, 3, IMG, IMG)
    expected = ref(x)
    keys = set(ref.state_dict())
    model = convert_timm_vit(ref)  # in place
    assert model is ref and isinstance(model, MaskedViT)
    assert set(model.state_dict()) == keys | {"mask_token"}
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.classify(model.forward_features(x)), expected, rtol=1e-5, atol=1e-5)
    assert convert_timm_vit(model) is model


def test_convert_rejects_non_vit_and_no_class_token():
    with pytest.raises(TypeError, match="VisionTransformer"):
        convert_timm_vit(torch.nn.Linear(2, 2))
    no_cls = tiny_timm("cls", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        convert_timm_vit(no_cls)
    assert type(no_cls).__name__ == "VisionTransformer"  # a failed conversion leaves the model alone


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_roundtrip_plain_and_safetensors(tmp_path):
    src = tiny_vit(num_classes=3)
    with torch.no_grad():
        src.mask_token.normal_()
    torch.save(src.state_dict(), tmp_path / "m.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    for name in ("m.pth", "m.safetensors"):
        torch.manual_seed(123)
        dst = tiny_vit(num_classes=3)
        report = load_checkpoint(dst, tmp_path / name)
        assert report.missing_keys == [] and report.unexpected_keys == [] and report.source_key is None
        assert _same_weights(src, dst)
    x = torch.randn(1, 3, IMG, IMG)
    torch.testing.assert_close(dst(x), src(x))


def test_checkpoint_dino_style_teacher_student_prefixes(tmp_path):
    src = tiny_vit()
    sd = src.state_dict()
    backbone = {k: v for k, v in sd.items() if k != "mask_token"}
    head = {"head.mlp.0.weight": torch.randn(8, DIM), "head.last_layer.weight_g": torch.ones(16, 1)}
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in backbone.items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in backbone.items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "epoch": 10,
        "args": argparse.Namespace(arch="vit_tiny"),  # DINO pickles its args: not weights-only loadable
    }
    torch.save(ckpt, tmp_path / "dino.pth")
    for key, expected_source in ((None, "teacher"), ("student", "student")):
        dst = tiny_vit()
        report = load_checkpoint(dst, tmp_path / "dino.pth", key=key)
        assert report.source_key == expected_source
        assert sorted(report.ignored_keys) == sorted(head)
        assert report.missing_keys == ["mask_token"]
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in backbone.items())
    with pytest.raises(KeyError, match="'nope' is not in the checkpoint"):
        load_checkpoint(tiny_vit(), tmp_path / "dino.pth", key="nope")


def test_checkpoint_of_the_training_driver(tmp_path):
    # python -m fastmask.train saves {"config", "method": Method.state_dict(), ...}: DINO/iBOT keep the
    # ViT under student.backbone. / teacher.backbone., MaskSub/MaskedKD under student. with a classifier.
    torch.manual_seed(0)
    student, teacher = tiny_vit(), tiny_vit()
    head = {"head.mlp.0.weight": torch.randn(8, DIM)}
    method_sd = {**{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
                 **{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
                 **{f"student.{k}": v for k, v in head.items()}, "loss_fn.center": torch.zeros(1, 16)}
    torch.save({"config": {"method": "dino"}, "method": method_sd, "step": 3}, tmp_path / "dino.pt")
    for key, src in ((None, student), ("teacher", teacher)):
        dst = tiny_vit()
        report = load_checkpoint(dst, tmp_path / "dino.pt", key=key)
        assert _same_weights(src, dst)
        assert report.source_key == f"method[{'teacher' if key else 'student'}.backbone.]"

    classifier = tiny_vit(num_classes=5)
    torch.save({"config": {"method": "masksub"}, "method": {f"student.{k}": v for k, v in classifier.state_dict().items()}},
               tmp_path / "masksub.pt")
    dst = tiny_vit()  # no classifier: the checkpoint's head is skipped and reported
    report = load_checkpoint(dst, tmp_path / "masksub.pt")
    assert report.ignored_keys == ["head.bias", "head.weight"] and _same_weights(dst, classifier)
    with pytest.raises(ValueError, match="no ViT weights"):
        load_checkpoint(tiny_vit(), tmp_path / "masksub.pt", key="teacher")


def test_checkpoint_ibot_masked_embed_and_pos_embed_resampling(tmp_path):
    src = create_vit("vit_tiny", patch_size=PATCH, img_size=IMG, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    sd = {k: v for k, v in src.state_dict().items() if k != "mask_token"}
    sd["masked_embed"] = torch.randn(1, DIM)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, tmp_path / "ibot.pth")
    dst = create_vit("vit_tiny", patch_size=PATCH, img_size=48, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    report = load_checkpoint(dst, tmp_path / "ibot.pth")
    assert report.resized_keys == ["pos_embed"] and report.missing_keys == []
    torch.testing.assert_close(dst.mask_token.reshape(-1), sd["masked_embed"].reshape(-1))
    expected = resample_abs_pos_embed(sd["pos_embed"], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), expected)


def test_checkpoint_classifier_head_mismatch_is_skipped_and_strict_errors(tmp_path):
    src = tiny_vit(num_classes=10)
    # MAE-style: the pixel decoder and its (decoder-width) mask token sit next to the encoder.
    mae = dict(src.state_dict(), mask_token=torch.zeros(1, 1, 16), **{"decoder_embed.weight": torch.zeros(16, DIM)})
    torch.save({"model": mae}, tmp_path / "cls.pth")
    dst = tiny_vit(num_classes=3)
    report = load_checkpoint(dst, tmp_path / "cls.pth")
    assert report.source_key == "model"
    assert set(report.ignored_keys) == {"head.weight", "head.bias", "mask_token", "decoder_embed.weight"}
    assert set(report.missing_keys) == {"head.weight", "head.bias", "mask_token"}
    assert torch.equal(dst.pos_embed, src.pos_embed)

    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(tiny_vit(num_classes=10), tmp_path / "partial.pth")
    report = load_checkpoint(tiny_vit(num_classes=10), tmp_path / "partial.pth", strict=False)
    assert "extra.weight" in report.unexpected_keys and any(k.startswith("blocks.1.") for k in report.missing_keys)

    wide = tiny_vit(embed_dim=60, num_heads=3)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="pos_embed in the checkpoint has shape"):
        load_checkpoint(tiny_vit(), tmp_path / "wide.pth")


def test_checkpoint_missing_file_and_plain_timm_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_checkpoint(tiny_vit(), tmp_path / "absent.pth")
    ref = tiny_timm("deit-distilled")
    torch.save(ref.state_dict(), tmp_path / "deit.pth")
    plain = tiny_timm("deit-distilled", seed=9)
    report = load_checkpoint(plain, tmp_path / "deit.pth")  # converts the plain timm model first
    assert isinstance(plain, MaskedViTDistilled) and report.missing_keys == ["mask_token"]
    x = torch.randn(1, 3, IMG, IMG)
    torch.testing.assert_close(plain(x), ref(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model = tiny_vit()
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(ValueError, match="ids_keep must index the N=16 patch tokens"):
        model.forward_features(x, ids_keep=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="ids_keep must index"):
        model.forward_features(x, ids_keep=torch.tensor([[-1, 3], [1, 2]]))
    with pytest.raises(TypeError, match="ids_keep must be int64"):
        model.forward_features(x, ids_keep=torch.tensor([[0, 1], [1, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="ids_keep must have shape"):
        model.forward_features(x, ids_keep=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="must not repeat"):
        model.forward_features(x, ids_keep=torch.tensor([[1, 1], [1, 2]]))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, N\] = \[2, 16\]"):
        model.forward_features(x, mask=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        model.forward_features(x, mask=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.forward_features(torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match="channels"):
        model.forward_features(torch.randn(2, 1, IMG, IMG))
    with pytest.raises(ValueError, match=r"x must be an image batch"):
        model.forward_features(torch.randn(3, IMG, IMG))
    with pytest.raises(ValueError, match="attn_layer"):
        model.forward_features(x, return_cls_attn=True, attn_layer=DEPTH)
    with pytest.raises(ValueError, match="tokens must be"):
        model.forward_features_from_tokens(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="unknown ViT"):
        create_vit("vit_huge")
    with pytest.raises(ValueError, match="never downloads"):
        create_vit("vit_tiny", pretrained=True)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_vit("vit_tiny", img_size=30, patch_size=8)


# ----------------------------------------------------------------------------------------------
# heads and the multi-crop wrapper
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_dino_head_shapes_norm_last_layer_and_weight_norm_compat():
    head = DINOHead(DIM, 300, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(5, DIM)
    out = head(x)
    assert out.shape == (5, 300)
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer: gain fixed at 1
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(300))
    # Outputs are cosine similarities between the normalised bottleneck and the prototypes.
    assert bool((out.abs() <= 1 + 1e-5).all())
    assert DINOHead(DIM, 300, norm_last_layer=False, hidden_dim=64).last_layer.weight_g.requires_grad
    default = DINOHead(DIM)
    assert default.last_layer.out_features == 65536 and default.mlp[-1].out_features == 256
    assert default.mlp[0].out_features == 2048 and sum(isinstance(m, torch.nn.Linear) for m in default.mlp) == 3
    assert DINOHead(DIM, 10, nlayers=1).mlp[0].out_features == 256
    bn = DINOHead(DIM, 10, use_bn=True, hidden_dim=32)
    assert bn(torch.randn(4, 6, DIM)).shape == (4, 6, 10)  # token-wise through BatchNorm1d
    # A head saved with torch's (legacy) weight_norm loads as is and computes the same layer.
    legacy = torch.nn.utils.weight_norm(torch.nn.Linear(16, 300, bias=False))
    with torch.no_grad():
        legacy.weight_g.uniform_(0.5, 2)
    ours = WeightNormLinear(16, 300, fix_gain=False)
    ours.load_state_dict(legacy.state_dict())
    z = torch.randn(3, 16)
    torch.testing.assert_close(ours(z), legacy(z), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="in_dim=48"):
        head(torch.randn(2, DIM + 1))
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(DIM, 0)


def test_ibot_head_shared_and_separate_patch_prototypes():
    shared = IBOTHead(DIM, 40, hidden_dim=32, bottleneck_dim=8)
    cls_out, patch_out = shared(torch.randn(2, DIM), torch.randn(2, 7, DIM))
    assert cls_out.shape == (2, 40) and patch_out.shape == (2, 7, 40) and shared.last_layer2 is None
    p = torch.randn(2, 7, DIM)
    torch.testing.assert_close(shared.forward_patch(p), shared.forward_cls(p.reshape(-1, DIM)).reshape(2, 7, 40))
    sep = IBOTHead(DIM, 40, patch_out_dim=24, hidden_dim=32, bottleneck_dim=8)
    cls_out, patch_out = sep(torch.randn(2, DIM), torch.randn(2, 7, DIM))
    assert cls_out.shape == (2, 40) and patch_out.shape == (2, 7, 24)
    assert sep(torch.randn(2, DIM))[1] is None
    assert IBOTHead(DIM, 40, shared_head=False, hidden_dim=32).last_layer2 is not None


def test_decoders_and_classifier_head():
    x = torch.randn(2, 17, DIM, requires_grad=True)
    assert LinearDecoder(DIM, 80)(x).shape == (2, 17, 80)
    dec = TransformerDecoder(DIM, 80, embed_dim=32, depth=2, num_heads=2)
    y = dec(x)
    assert y.shape == (2, 17, 80)
    y.sum().backward()
    assert x.grad is not None and all(type(b.attn) is Attention for b in dec.blocks)
    with pytest.raises(ValueError, match="divisible"):
        TransformerDecoder(DIM, 80, embed_dim=30, num_heads=4)
    for norm in ClassifierHead.NORMS:
        assert ClassifierHead(DIM, 7, norm=norm)(torch.randn(4, DIM)).shape == (4, 7)
    with pytest.raises(ValueError, match="norm must be one of"):
        ClassifierHead(DIM, 7, norm="group")
    with pytest.raises(ValueError, match="pooled features"):
        ClassifierHead(DIM, 7)(torch.randn(4, 3, DIM))


def test_multicrop_wrapper_equals_per_crop_calls():
    model = tiny_vit()
    head = IBOTHead(DIM, 40, patch_out_dim=24, hidden_dim=32, bottleneck_dim=8)
    wrapper = MultiCropWrapper(model, head).eval()
    g = torch.Generator().manual_seed(7)
    globals_ = [torch.randn(2, 3, IMG, IMG, generator=g) for _ in range(2)]
    locals_ = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(3)]
    crops = globals_ + locals_
    masks = [torch.rand(2, N, generator=g) < 0.3, None, None, None, None]  # second global unmasked
    out = wrapper(crops, masks=masks, return_patch=True, return_cls_attn=True)
    assert out.cls.shape == (10, 40) and out.features.shape == (10, DIM) and len(out.patch) == 5
    for i, crop in enumerate(crops):
        feats = model.forward_features(crop, mask=masks[i], return_cls_attn=True)
        rows = slice(2 * i, 2 * i + 2)
        torch.testing.assert_close(out.features[rows], feats.cls, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.cls[rows], head.forward_cls(feats.cls), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.patch[i], head.forward_patch(feats.patch), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.cls_attn[i], feats.cls_attn, rtol=1e-5, atol=1e-6)
    # A DINO head (forward only) and token dropping on the global crops.
    dino = MultiCropWrapper(model, DINOHead(DIM, 30, hidden_dim=32, bottleneck_dim=8)).eval()
    ids = [random_ids(2, N, 6, g), random_ids(2, N, 6, g), None, None, None]
    out = dino(crops, ids_keep=ids)
    assert out.patch is None and out.cls_attn is None
    for i, crop in enumerate(crops):
        expected = dino.head(model.forward_features(crop, ids_keep=ids[i]).cls)
        torch.testing.assert_close(out.cls[2 * i:2 * i + 2], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="either none or all"):
        dino(crops, ids_keep=[ids[0], None, None, None, None])
    with pytest.raises(ValueError, match="one entry"):
        dino(crops, masks=masks[:2])
    with pytest.raises(TypeError, match="forward_features"):
        MultiCropWrapper(torch.nn.Linear(2, 2), dino.head)


def test_triton_backend_matches_torch_reference_end_to_end(monkeypatch):
    model = tiny_vit(embed_dim=64, num_heads=2)  # head_dim 32
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, IMG, IMG, generator=g)
    ids = random_ids(2, N, 7, g)
    mask = torch.rand(2, N, generator=g) < 0.5
    ref = model.forward_features(x, ids_keep=ids, mask=mask, return_cls_attn=True)
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    out = model.forward_features(x, ids_keep=ids, mask=mask, return_cls_attn=True)
    torch.testing.assert_close(out.patch, ref.patch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.cls_attn, ref.cls_attn, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_vit_small_bf16_kernels_match_torch_reference(monkeypatch):
    """ViT-S/16 at 224 px under bf16 autocast: forward with dropped tokens, mask tokens and the CLS
    map, and the backward, on the Triton kernels against the PyTorch reference ops.  (Forcing one
    backend for every op: the attention op has no CUDA-extension version.)"""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = create_vit("vit_small", num_classes=10, depth=3).to(dev)
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(8, 3, 224, 224, device=dev)
    ids = torch.rand(8, 196, device=dev).argsort(1)[:, :98].sort(1).values
    mask = torch.rand(8, 196, device=dev) < 0.4

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, cls_attn = model(x, ids_keep=ids, mask=mask, return_cls_attn=True)
        logits.float().square().mean().backward()
        return logits.float(), cls_attn, model.pos_embed.grad.clone(), model.blocks[0].attn.qkv.weight.grad.clone()

    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    ref = run()
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    out = run()
    torch.testing.assert_close(out[0], ref[0], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out[1], ref[1], rtol=2e-2, atol=2e-3)
    for a, b in zip(out[2:], ref[2:]):
        assert (a.float() - b.float()).norm() <= 0.05 * b.float().norm() + 1e-6
