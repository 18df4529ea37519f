"""fastmask.nn.Attention against timm's Attention, the CLS map against explicit softmax, conversion."""
import copy

import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention

from fastmask.nn import Attention, Block, convert_attention, explicit_attention, iter_attention

DIM, HEADS = 48, 3

CONFIGS = [
    dict(qkv_bias=True),
    dict(qkv_bias=False, proj_bias=False),
    dict(qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm),
    dict(qkv_bias=True, scale_norm=True, norm_layer=torch.nn.LayerNorm, gated=True),
]


def _pair(cfg, seed=0):
    torch.manual_seed(seed)
    ref = TimmAttention(DIM, HEADS, **cfg).eval()
    ours = Attention(DIM, HEADS, **cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _explicit_probs(attn, x):
    """softmax(q k^T * scale) [B, H, L, L] from the module's own weights (independent of its forward)."""
    B, L, _ = x.shape
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, _ = qkv.reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return torch.softmax((q @ k.transpose(-2, -1)).double() * attn.scale, dim=-1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(sorted(k for k in c if k != "norm_layer")))
def test_state_dict_keys_and_shapes_match_timm(cfg):
    ref, ours = _pair(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(sorted(k for k in c if k != "norm_layer")))
@pytest.mark.parametrize("L", [1, 17, 50])
def test_output_and_grads_match_timm(cfg, L):
    ref, ours = _pair(cfg, seed=L)
    x = torch.randn(3, L, DIM, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_ref = ref(x)
    out = ours(x2)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("num_prefix_tokens", [1, 2])
@pytest.mark.parametrize("L", [5, 37])
def test_cls_attn_equals_explicit_softmax(num_prefix_tokens, L):
    torch.manual_seed(L + num_prefix_tokens)
    attn = Attention(DIM, HEADS, qkv_bias=True, num_prefix_tokens=num_prefix_tokens).eval()
    x = torch.randn(2, L, DIM)
    out, cls_attn = attn(x, return_cls_attn=True)
    probs = _explicit_probs(attn, x)
    expected = probs[:, :, 0, num_prefix_tokens:].mean(1)
    assert cls_attn.dtype == torch.float32 and cls_attn.shape == (2, L - num_prefix_tokens)
    assert not cls_attn.requires_grad
    torch.testing.assert_close(cls_attn.double(), expected, rtol=1e-5, atol=1e-6)
    # Rows leave out the prefix columns: they sum to at most 1.
    assert bool((cls_attn.sum(-1) <= 1 + 1e-5).all()) and bool((cls_attn >= 0).all())
    # The explicit path gives the same map, the same output, and the full matrix.
    out_e, cls_e, matrix = attn(x, return_cls_attn=True, return_attn_matrix=True)
    torch.testing.assert_close(cls_e, cls_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_e, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matrix.double(), probs, rtol=1e-5, atol=1e-6)


def test_cls_map_is_a_return_value_only():
    attn = Attention(DIM, HEADS, qkv_bias=True).eval()
    x = torch.randn(2, 9, DIM, requires_grad=True)
    before = dict(vars(attn))
    out, cls_attn = attn(x, return_cls_attn=True)
    assert cls_attn.shape == (2, 8) and not cls_attn.requires_grad
    # No module state changes during a call (no map kept on the module).
    assert vars(attn).keys() == before.keys() and not hasattr(attn, "cls_attn")
    assert not hasattr(attn, "store_cls_attn")
    # The full matrix is a return value too: no attribute path to keep it on the module.
    assert not hasattr(attn, "store_attn_matrix") and not hasattr(attn, "attn_matrix")
    _, matrix = attn(x, return_attn_matrix=True)
    assert vars(attn).keys() == before.keys() and not hasattr(attn, "attn_matrix")
    assert matrix.shape == (2, HEADS, 9, 9) and matrix.dtype == torch.float32
    torch.testing.assert_close(matrix.sum(-1), torch.ones(2, HEADS, 9))


def _hvp(module, x, v):
    params = list(module.parameters())
    loss = module(x).pow(2).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=v)


def test_explicit_path_double_backward_matches_timm_math():
    ref, ours = _pair(dict(qkv_bias=True), seed=3)
    ref.fused_attn = False  # timm's explicit softmax path (twice differentiable)
    x = torch.randn(2, 11, DIM)
    v = [torch.randn_like(p) for p in ours.parameters()]
    with explicit_attention(ours):
        assert ours.explicit_attention
        hv = _hvp(ours, x, v)
    assert not ours.explicit_attention
    hv_ref = _hvp(ref, x, v)
    for a, b in zip(hv, hv_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_attn_mask_and_causal_follow_sdpa_semantics(kind):
    ref, ours = _pair(dict(qkv_bias=True), seed=4)
    L = 7
    x = torch.randn(2, L, DIM)
    kwargs = {}
    if kind == "bool":
        m = torch.rand(L, L) > 0.3
        m.fill_diagonal_(True)
        kwargs["attn_mask"] = m
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(L, L)
    else:
        kwargs["is_causal"] = True
    torch.testing.assert_close(ours(x, **kwargs), ref(x, **kwargs), rtol=1e-5, atol=1e-5)


def test_attention_dropout_in_training_uses_explicit_path():
    attn = Attention(DIM, HEADS, attn_drop=0.5).train()
    x = torch.randn(2, 9, DIM)
    torch.manual_seed(0)
    a = attn(x)
    torch.manual_seed(0)
    b = attn(x)
    torch.testing.assert_close(a, b)  # same dropout draw -> same result
    attn.eval()
    torch.manual_seed(0)
    assert not torch.allclose(attn(x), a)  # dropout was active in training


def test_autocast_bf16_with_qk_norm_runs_and_is_close():
    _, ours = _pair(dict(qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm), seed=5)
    x = torch.randn(2, 17, DIM)
    ref = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, cls_attn = ours(x, return_cls_attn=True)
    assert cls_attn.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def _tiny_timm(name="vit_tiny_patch16_224", **kw):
    cfg = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=5)
    cfg.update(kw)
    return timm.create_model(name, **cfg).eval()


@pytest.mark.parametrize(
    "name,kw,prefix",
    [("vit_tiny_patch16_224", {}, 1), ("deit_tiny_distilled_patch16_224", {}, 2), ("vit_tiny_patch16_224", dict(reg_tokens=2), 3)],
    ids=["vit", "deit-distilled", "registers"],
)
def test_convert_attention_keeps_outputs_and_parameters(name, kw, prefix):
    torch.manual_seed(0)
    model = _tiny_timm(name, **kw)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert convert_attention(model) == 2
    assert all(type(b.attn) is Attention for b in model.blocks)
    assert all(m.num_prefix_tokens == prefix for m in iter_attention(model))
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    # The CLS map of a converted block is over the patch keys only.
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    _, cls_attn = model.blocks[-1].attn(tokens, return_cls_attn=True)
    assert cls_attn.shape == (2, 16)
    # Converting again only updates num_prefix_tokens.
    assert convert_attention(model, num_prefix_tokens=1) == 0
    assert all(m.num_prefix_tokens == 1 for m in iter_attention(model))


def test_timm_weights_load_unchanged_into_fastmask_block():
    from timm.models.vision_transformer import Block as TimmBlock

    torch.manual_seed(0)
    ref = TimmBlock(DIM, HEADS, qkv_bias=True).eval()
    ours = Block(DIM, HEADS, qkv_bias=True).eval()
    assert type(ours.attn) is Attention
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 10, DIM)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    attn = Attention(DIM, HEADS)
    with pytest.raises(ValueError, match="x must be a \\[B, L, C\\]"):
        attn(torch.randn(4, DIM))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        Attention(DIM, HEADS, num_prefix_tokens=-1)
    no_prefix = Attention(DIM, HEADS, num_prefix_tokens=0)
    no_prefix(torch.randn(1, 4, DIM))  # fine without a map
    with pytest.raises(ValueError, match="CLS map needs a prefix"):
        no_prefix(torch.randn(1, 4, DIM), return_cls_attn=True)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_attention("not a module")


def test_module_on_triton_backend_matches_torch(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 2, qkv_bias=True).eval()  # head_dim 32
    x = torch.randn(2, 13, 64)
    ref_out, ref_cls = attn(x, return_cls_attn=True)
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    out, cls_attn = attn(x, return_cls_attn=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls_attn, ref_cls, rtol=1e-4, atol=1e-5)


def test_deepcopy_and_pickle_roundtrip_keep_flags():
    attn = Attention(DIM, HEADS, num_prefix_tokens=2, explicit_attention=True)
    clone = copy.deepcopy(attn)
    assert clone.num_prefix_tokens == 2 and clone.explicit_attention


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_block_returns_the_cls_map_of_its_attention(init_values):
    from timm.models.vision_transformer import Block as TimmBlock

    from fastmask.nn import convert_blocks

    torch.manual_seed(1)
    ref = TimmBlock(DIM, HEADS, qkv_bias=True, init_values=init_values).eval()
    ours = copy.deepcopy(ref)
    assert convert_blocks(ours, num_prefix_tokens=2) == 1 and type(ours) is Block
    x = torch.randn(2, 11, DIM)
    out, cls_attn = ours(x, return_cls_attn=True)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), out)
    _, expected = ours.attn(ours.norm1(x), return_cls_attn=True)
    assert cls_attn.shape == (2, 9)
    torch.testing.assert_close(cls_attn, expected)
    # The full matrix comes back too (after the map, as the attention orders them), from the explicit path.
    out_m, cls_m, matrix = ours(x, return_cls_attn=True, return_attn_matrix=True)
    _, expected_matrix = ours.attn(ours.norm1(x), return_attn_matrix=True)
    torch.testing.assert_close(out_m, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls_m, cls_attn, rtol=1e-5, atol=1e-6)
    assert matrix.shape == (2, HEADS, 11, 11)
    torch.testing.assert_close(matrix, expected_matrix)
    torch.testing.assert_close(matrix[:, :, 0, 2:].mean(1), cls_attn, rtol=1e-5, atol=1e-6)
