"""Mask policies (fastmask.masking): random, block-wise, AttMask, and the MaskedKD keep-set."""
import pytest
import torch

from fastmask import ops, reference
from fastmask.masking import (
    AttMaskPolicy,
    BlockMaskPolicy,
    block_masks,
    build_mask_policy,
    maskedkd_keep_ids,
    maskedkd_patch_ids,
    sample_ratios,
)
from helpers import DEVICE, KERNEL_BACKENDS


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def components(grid: torch.Tensor):
    """Sizes of the 4-connected components of a [h, w] bool grid."""
    h, w = grid.shape
    cells = grid.cpu().tolist()
    seen = [[False] * w for _ in range(h)]
    sizes = []
    for i in range(h):
        for j in range(w):
            if cells[i][j] and not seen[i][j]:
                stack, size = [(i, j)], 0
                seen[i][j] = True
                while stack:
                    a, b = stack.pop()
                    size += 1
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        x, y = a + da, b + db
                        if 0 <= x < h and 0 <= y < w and cells[x][y] and not seen[x][y]:
                            seen[x][y] = True
                            stack.append((x, y))
                sizes.append(size)
    return sizes


# ------------------------------------------------------------------------------------------------
# sample_ratios
# ------------------------------------------------------------------------------------------------

def test_sample_ratios_range_device_and_reproducibility():
    r = sample_ratios(5000, 0.1, 0.5, generator=gen(0), device=DEVICE)
    assert r.dtype == torch.float32 and r.shape == (5000,) and r.device == DEVICE
    assert float(r.min()) >= 0.1 and float(r.max()) <= 0.5
    assert abs(float(r.mean()) - 0.3) < 0.01 and float(r.std()) > 0.1
    assert torch.equal(r, sample_ratios(5000, 0.1, 0.5, generator=gen(0), device=DEVICE))
    assert torch.equal(sample_ratios(3, 0.25, 0.25, device=DEVICE), torch.full((3,), 0.25, device=DEVICE))
    assert sample_ratios(0, 0.1, 0.2).shape == (0,)
    with pytest.raises(ValueError, match="low <= high"):
        sample_ratios(4, 0.5, 0.1)
    with pytest.raises(ValueError, match="low/high"):
        sample_ratios(4, -0.1, 0.1)
    with pytest.raises(ValueError, match="batch"):
        sample_ratios(-1, 0.1, 0.2)


# ------------------------------------------------------------------------------------------------
# build_mask_policy
# ------------------------------------------------------------------------------------------------

def test_build_mask_policy_names_defaults_and_errors():
    high = build_mask_policy("attmask_high")
    assert isinstance(high, AttMaskPolicy) and high.mode == "high" and high.needs_cls_attn
    # The official code's defaults (main_attmask.py): one ratio per batch, hint count tied to it.
    assert (high.mask_prob, high.ratio, high.show_max) == (0.5, (0.1, 0.5), 0.1)
    assert (high.ratio_per, high.hint_count) == ("batch", "tied")
    assert build_mask_policy("attmask_low").mode == "low"
    assert build_mask_policy("attmask_hint", show_ratio=0.02, hint_count="independent").show_ratio == 0.02
    assert build_mask_policy("attmask_hint", show_ratio=None).hint_count == "tied"  # tied needs no show_ratio
    assert build_mask_policy("random", ratio=(0.1, 0.5)).ratio_per == "sample"  # iBOT's loader: per image
    assert build_mask_policy("block", ratio=(0.1, 0.5)).ratio_per == "sample"
    assert isinstance(build_mask_policy("block", ratio=(0.1, 0.5), min_num_patches=16), BlockMaskPolicy)
    assert not build_mask_policy("none", ratio=0.3)(2, (3, 3)).any()  # none ignores options
    with pytest.raises(ValueError, match="mask policy"):
        build_mask_policy("checkerboard")
    with pytest.raises(TypeError, match="show_max"):
        build_mask_policy("random", ratio=0.5, show_max=0.1)
    with pytest.raises(ValueError, match="ratio"):
        build_mask_policy("random", ratio=1.0)
    with pytest.raises(ValueError, match="ratio"):
        build_mask_policy("block", ratio=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_prob"):
        build_mask_policy("attmask_high", mask_prob=1.5)
    with pytest.raises(ValueError, match="show_ratio"):
        build_mask_policy("attmask_hint", show_ratio=None, hint_count="independent")
    with pytest.raises(ValueError, match="show_ratio"):
        build_mask_policy("attmask_hint", show_max=0.1, show_ratio=(0.01, 0.2), hint_count="independent")
    with pytest.raises(ValueError, match="ratio_per"):
        build_mask_policy("attmask_high", ratio_per="image")
    with pytest.raises(ValueError, match="hint_count"):
        build_mask_policy("attmask_hint", hint_count="fixed")
    with pytest.raises(ValueError, match="aspect_ratio"):
        build_mask_policy("block", aspect_ratio=(0.0, 2.0))
    with pytest.raises(ValueError, match="grid_size"):
        build_mask_policy("random", ratio=0.5)(2, (14,))


# ------------------------------------------------------------------------------------------------
# random
# ------------------------------------------------------------------------------------------------

def test_random_policy_counts_uniformity_and_gate():
    N = 49
    mask = build_mask_policy("random", ratio=0.75)(2000, (7, 7), generator=gen(1), device=DEVICE)
    assert mask.shape == (2000, N) and mask.dtype == torch.bool and mask.device == DEVICE
    assert bool((mask.sum(1) == int(0.75 * N)).all())
    freq = mask.float().mean(0)  # every position equally likely to be hidden
    assert float((freq - int(0.75 * N) / N).abs().max()) < 0.05
    assert torch.equal(mask, build_mask_policy("random", ratio=0.75)(2000, (7, 7), generator=gen(1), device=DEVICE))

    policy = build_mask_policy("random", ratio=(0.1, 0.5), mask_prob=0.5)
    g = gen(2)
    mask = policy(1000, (7, 7), generator=g, device=DEVICE)
    # Same generator state -> the ratios the policy drew first.
    ratios = sample_ratios(1000, 0.1, 0.5, generator=gen(2), device=DEVICE)
    counts = torch.floor(ratios.double() * N).long()
    masked_rows = mask.any(1)
    assert abs(float(masked_rows.float().mean()) - 0.5) < 0.06
    assert torch.equal(mask.sum(1)[masked_rows], counts[masked_rows])


# ------------------------------------------------------------------------------------------------
# block
# ------------------------------------------------------------------------------------------------

def test_block_policy_exact_counts_and_block_shapes():
    B, h, w = 64, 14, 14
    policy = build_mask_policy("block", ratio=0.4)
    mask = policy(B, (h, w), generator=gen(3), device=DEVICE)
    assert mask.shape == (B, h * w) and mask.device == DEVICE
    assert bool((mask.sum(1) == int(0.4 * h * w)).all()), "exact count per sample"
    comps = [components(m.view(h, w)) for m in mask]
    # Rectangles of >= 16 patches: few, large connected regions (a uniform random mask of the same
    # density falls apart into many small pieces).
    assert sum(len(c) for c in comps) / B <= 5
    assert sum(max(c) for c in comps) / B >= 30
    rnd = build_mask_policy("random", ratio=0.4)(B, (h, w), generator=gen(3), device=DEVICE)
    assert sum(len(components(m.view(h, w))) for m in rnd) / B > 10
    # Both orientations occur (aspect ratio drawn from [0.3, 1/0.3] on a log scale).
    tall = wide = 0
    for m in mask:
        rows, cols = m.view(h, w).nonzero(as_tuple=True)
        tall += int(rows.max() - rows.min()) > int(cols.max() - cols.min())
        wide += int(rows.max() - rows.min()) < int(cols.max() - cols.min())
    assert tall > 0 and wide > 0


def test_block_policy_per_sample_ratios_and_gate():
    B, h, w = 200, 7, 9
    policy = build_mask_policy("block", ratio=(0.1, 0.5), mask_prob=0.5, min_num_patches=4)
    mask = policy(B, (h, w), generator=gen(4), device=DEVICE)
    ratios = sample_ratios(B, 0.1, 0.5, generator=gen(4), device=DEVICE)
    counts = torch.floor(ratios.double() * h * w).long()
    masked_rows = mask.any(1)
    assert abs(float(masked_rows.float().mean()) - 0.5) < 0.1
    assert torch.equal(mask.sum(1)[masked_rows], counts[masked_rows])
    assert len(set(counts[masked_rows].tolist())) > 5, "ratios differ per sample"


def test_block_masks_edge_counts():
    counts = torch.tensor([0, 1, 15, 16, 63, 64], device=DEVICE)
    mask = block_masks(counts, (8, 8), generator=gen(5))
    assert torch.equal(mask.sum(1), counts)


# ------------------------------------------------------------------------------------------------
# AttMask
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["high", "low", "hint"])
def test_attmask_policy_uses_cls_attention(mode):
    B, h, w = 64, 7, 7
    attn = torch.rand(B, h * w, generator=torch.Generator().manual_seed(0)).softmax(-1).to(DEVICE)
    # fastmask's per-image variants (the official per-batch / tied forms are pinned below).
    policy = build_mask_policy(f"attmask_{mode}", ratio_per="sample", hint_count="independent")
    mask = policy(B, (h, w), cls_attn=attn, generator=gen(6))
    assert mask.shape == (B, h * w) and mask.device == attn.device
    # The same draws by hand: mask ratios, hint ratios, then the op's seed.
    g = gen(6)
    ratio = sample_ratios(B, 0.1, 0.5, generator=g, device=DEVICE)
    show = sample_ratios(B, 0.01, 0.05, generator=g, device=DEVICE) if mode == "hint" else None
    expected = ops.cls_attention_mask(attn, ratio, mode=mode, mask_prob=0.5, show_max=0.1, show_ratio=show, generator=g)
    assert torch.equal(mask, expected)
    masked_rows = mask.any(1)
    assert 0.25 < float(masked_rows.float().mean()) < 0.75
    counts = torch.floor(ratio.double() * h * w).long()
    if mode != "hint":
        assert torch.equal(mask.sum(1)[masked_rows], counts[masked_rows])
        for b in masked_rows.nonzero().flatten().tolist():
            hidden, visible = attn[b][mask[b]], attn[b][~mask[b]]
            if mode == "high":
                assert float(hidden.min()) >= float(visible.max())
            else:
                assert float(hidden.max()) <= float(visible.min())


def _official_attmask(attention, masking_prob, masking_mode, masking_ratio, show_ratio, show_max, gate_u):
    """gkakogeorgiou/attmask attmask.py ``AttMask`` (get_mask / attention_masking / show_hints), written
    out with its gate draws given (``gate_u``) and its hint draws left out: the counts it hides and
    reveals, for comparison with the policy's."""
    n = attention.shape[1]
    hidden = int(n * masking_ratio)
    order = torch.argsort(attention, descending=masking_mode != "attmask_low")
    mask = torch.zeros_like(attention, dtype=torch.bool).scatter_(1, order[:, :hidden], True)
    mask[gate_u > masking_prob] = False
    shown = int(show_ratio * n) if masking_mode == "attmask_hint" else 0
    pool = torch.zeros_like(mask).scatter_(1, order[:, :int(n * show_max)], True)
    return mask, shown, pool


@pytest.mark.parametrize("mode", ["high", "low", "hint"])
def test_attmask_ratio_per_batch_hides_one_count_per_batch(mode):
    """Official AttMask (main_attmask.py train_one_epoch): ``get_pred_ratio()`` once per iteration, so every
    masked row of the batch hides the same int(ratio * N) tokens, and different batches differ."""
    B, N = 48, 196
    attn = torch.rand(B, N, generator=torch.Generator().manual_seed(3)).softmax(-1).to(DEVICE)
    policy = build_mask_policy(f"attmask_{mode}", mask_prob=1.0)
    assert policy.ratio_per == "batch"
    seen = set()
    for seed in range(6):
        mask = policy(B, (14, 14), cls_attn=attn, generator=gen(seed))
        hidden = mask.sum(1)
        if mode == "hint":  # the tied hint count is the same for every row too
            g = gen(seed)
            r = float(0.1 + 0.4 * torch.rand(1, generator=g, device=DEVICE))
            hidden = hidden + int(0.1 * r * N)
        assert int(hidden.min()) == int(hidden.max()), "one count for the whole batch"
        assert 0.1 * N - 1 <= int(hidden[0]) <= 0.5 * N
        seen.add(int(hidden[0]))
    assert len(seen) > 1, "a new ratio each batch"
    # fastmask's variant: one ratio per row
    per_row = build_mask_policy(f"attmask_{mode}", mask_prob=1.0, ratio_per="sample", hint_count="independent")
    assert len(set(per_row(B, (14, 14), cls_attn=attn, generator=gen(0)).sum(1).tolist())) > 1


def test_attmask_hint_count_tied_to_ratio():
    """attmask.py show_hints reveals int(show_ratio * N) tokens with show_ratio = show_max * pred_ratio,
    all among the int(show_max * N) most attended: the policy hides exactly what the official code hides
    (same mask-ratio draw, gate on) and reveals exactly as many tokens from the same pool."""
    B, N = 32, 196
    attn = torch.rand(B, N, generator=torch.Generator().manual_seed(4)).softmax(-1).to(DEVICE)
    policy = build_mask_policy("attmask_hint", mask_prob=1.0)
    for seed in range(4):
        mask = policy(B, (14, 14), cls_attn=attn, generator=gen(seed))
        r = float(0.1 + 0.4 * torch.rand(1, generator=gen(seed), device=DEVICE))
        official, shown, pool = _official_attmask(attn, 1.0, "attmask_hint", r, 0.1 * r, 0.1, torch.zeros(B))
        assert shown == int(0.1 * r * N)
        assert not (mask & ~official).any(), "hides nothing the official high mask does not"
        revealed = official & ~mask
        assert torch.equal(revealed.sum(1), torch.full((B,), shown, device=DEVICE))
        assert not (revealed & ~pool.to(revealed.device)).any(), "hints come from the top show_max pool"
    # Across many ratios the revealed count follows the ratio (the official correlation is ~0.99).
    ratios = torch.linspace(0.1, 0.49, 40)
    counts = [int(build_mask_policy("attmask_hint", ratio=float(r), mask_prob=1.0)(
        4, (14, 14), cls_attn=attn[:4], generator=gen(0)).logical_xor(
        ops.cls_attention_mask(attn[:4], float(r), mode="high")).sum(1)[0]) for r in ratios]
    assert counts == [int(0.1 * float(r) * N) for r in ratios]
    # fastmask's variant draws show_ratio ~ U(0.01, 0.05) on its own
    independent = build_mask_policy("attmask_hint", ratio=0.3, mask_prob=1.0, hint_count="independent")
    revealed = ops.cls_attention_mask(attn, 0.3, mode="high") & ~independent(B, (14, 14), cls_attn=attn, generator=gen(1))
    assert len(set(revealed.sum(1).tolist())) > 1


def test_attmask_gate_matches_official_rate():
    """get_mask: rows with a U(0,1) draw above masking_prob stay visible -> about half the rows masked."""
    B, N = 4000, 49
    attn = torch.rand(B, N, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mask = build_mask_policy("attmask_high")(B, (7, 7), cls_attn=attn, generator=gen(2))
    assert 0.46 < float(mask.any(1).float().mean()) < 0.54


def test_attmask_policy_needs_cls_attn():
    policy = build_mask_policy("attmask_hint")
    with pytest.raises(ValueError, match="cls_attn"):
        policy(4, (7, 7))
    with pytest.raises(ValueError, match="cls_attn"):
        policy(4, (7, 7), cls_attn=torch.rand(4, 50, device=DEVICE))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_policies_run_on_kernel_backends(backend, monkeypatch):
    attn = torch.rand(3, 49, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    outs = {}
    for forced in ("torch", backend):
        monkeypatch.setenv("FASTMASK_BACKEND", forced)
        outs[forced] = [
            build_mask_policy(name)(3, (7, 7), cls_attn=attn, generator=gen(7))
            for name in ("attmask_high", "attmask_low", "attmask_hint")
        ] + [build_mask_policy("random", ratio=(0.2, 0.6))(3, (7, 7), generator=gen(7), device=DEVICE)]
    for a, b in zip(outs["torch"], outs[backend]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# MaskedKD keep-set
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 5])
def test_maskedkd_keep_ids(num_prefix_tokens):
    B, N, keep = 3, 196, 98
    attn = torch.rand(B, N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ids = maskedkd_keep_ids(attn, keep, num_prefix_tokens=num_prefix_tokens)
    p = num_prefix_tokens
    assert ids.shape == (B, p + keep) and ids.dtype == torch.int64
    assert torch.equal(ids[:, :p], torch.arange(p, device=DEVICE).expand(B, p)), "prefix (CLS) always kept, first"
    assert torch.equal(ids[:, p:] - p, reference.topk_tokens(attn, keep))
    assert torch.equal(ids, torch.sort(ids, dim=1).values)
    assert torch.equal(maskedkd_patch_ids(attn, keep), ids[:, p:] - p)
    # The kept patches are the most attended ones.
    for b in range(B):
        kept = torch.zeros(N, dtype=torch.bool, device=DEVICE)
        kept[ids[b, p:] - p] = True
        assert float(attn[b][kept].min()) >= float(attn[b][~kept].max())
    # Used as gather indices on the full [B, p + N, D] sequence.
    tokens = torch.randn(B, p + N, 8, device=DEVICE)
    kept_tokens = ops.gather_tokens(tokens, ids)
    assert torch.equal(kept_tokens[:, :p], tokens[:, :p])


def test_maskedkd_keep_ids_edges_and_errors():
    attn = torch.rand(2, 10, device=DEVICE)
    assert torch.equal(maskedkd_keep_ids(attn, 0), torch.zeros(2, 1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(maskedkd_keep_ids(attn, 10)[0], torch.arange(11, device=DEVICE))
    with pytest.raises(ValueError, match="k must"):
        maskedkd_keep_ids(attn, 11)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        maskedkd_keep_ids(attn, 3, num_prefix_tokens=-1)
