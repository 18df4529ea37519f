"""The Masked-Distillation analysis toolkit: every measure on hand-made cases with known answers,
the layer capture against the model's own attention, and the CLI end to end on tiny checkpoints."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastmask.analysis import (
    AnalysisConfig,
    LayerRecorder,
    analyze_models,
    attention_distance,
    attention_entropy,
    attention_matrix,
    attention_nmi,
    fourier_relative_log_amplitude,
    hutchinson_trace,
    hvp,
    image_spectrum,
    loss_landscape_2d,
    math_attention,
    relative_log_singular_values,
    token_spectrum,
    top_eigenvalues,
)

FLOOR = math.log(1e-10)  # anything below this is "zero" for a relative log singular value


pytestmark = pytest.mark.usefixtures("one_thread")


def _uniform(batch, heads, length):
    return torch.full((batch, heads, length, length), 1.0 / length)


def _with_prefix(patch_attn, prefix, prefix_weight):
    """Embed a patch-to-patch attention [B, H, N, N] into [B, H, P+N, P+N]: patch queries put
    ``prefix_weight`` on the first prefix token; prefix queries attend uniformly."""
    b, h, n, _ = patch_attn.shape
    length = prefix + n
    full = torch.full((b, h, length, length), 1.0 / length)
    full[:, :, prefix:, :] = 0
    full[:, :, prefix:, 0] = prefix_weight
    full[:, :, prefix:, prefix:] = patch_attn * (1 - prefix_weight)
    return full


# ------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("length", [5, 17])
def test_uniform_attention_entropy_log_n_and_nmi_zero(length):
    attn = _uniform(2, 3, length)
    torch.testing.assert_close(attention_entropy(attn), torch.full((3,), math.log(length), dtype=torch.float64))
    torch.testing.assert_close(attention_nmi(attn), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_self_attention_distance_zero_entropy_zero_nmi_one():
    grid, prefix = (3, 4), 1
    n = grid[0] * grid[1]
    eye = torch.eye(n).expand(2, 2, n, n)
    # CLS takes half of every patch query's attention: the distance must ignore it.
    attn = _with_prefix(eye, prefix, 0.5)
    torch.testing.assert_close(attention_distance(attn, grid, 16, prefix), torch.zeros(2, dtype=torch.float64))
    full_eye = torch.eye(n + 1).expand(1, 2, n + 1, n + 1)
    torch.testing.assert_close(attention_entropy(full_eye), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(attention_nmi(full_eye), torch.ones(2, dtype=torch.float64))


def test_uniform_patch_attention_distance_is_mean_pairwise_pixel_distance():
    grid, patch = (2, 3), 14
    coords = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    expected = sum(math.hypot(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords) * patch / len(coords) ** 2
    n = len(coords)
    attn = _with_prefix(torch.full((1, 1, n, n), 1.0 / n), 1, 0.3)
    assert attention_distance(attn, grid, patch, 1).item() == pytest.approx(expected, rel=1e-12)


def test_neighbour_attention_distance_is_one_patch():
    # Every query attends to its right neighbour (the last column to its left one): one patch away.
    gh, gw, patch = 3, 4, 8
    n = gh * gw
    attn = torch.zeros(1, 2, n, n)
    for r in range(gh):
        for c in range(gw):
            attn[0, :, r * gw + c, r * gw + (c + 1 if c + 1 < gw else c - 1)] = 1
    assert torch.allclose(attention_distance(attn, (gh, gw), patch, 0), torch.full((2,), float(patch), dtype=torch.float64))


def test_nmi_block_structure_is_one_half():
    # Queries {0,1} attend uniformly to keys {0,1}, queries {2,3} to {2,3}: I = log 2, H(q) = H(k) = log 4.
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, :2, :2] = 0.5
    attn[0, 0, 2:, 2:] = 0.5
    assert attention_nmi(attn).item() == pytest.approx(0.5, abs=1e-12)
    # All queries on one key: H(k) = 0, no information; defined as 0 rather than 0/0.
    one_key = torch.zeros(1, 1, 4, 4)
    one_key[..., 1] = 1
    assert attention_nmi(one_key).item() == 0.0


def test_attention_measures_reject_bad_input():
    with pytest.raises(ValueError, match="attn"):
        attention_entropy(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="L=5"):
        attention_distance(_uniform(1, 1, 5), (2, 3), 16, 1)
    with pytest.raises(TypeError, match="attn"):
        attention_nmi(torch.ones(1, 1, 2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------- features

def test_rank_one_features_have_one_nonzero_singular_value():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 10, 1, generator=g, dtype=torch.float64)
    v = torch.randn(3, 1, 7, generator=g, dtype=torch.float64)
    spec = token_spectrum(u @ v)
    assert spec.shape == (7,)
    assert spec[0].item() == 0.0
    assert (spec[1:] < FLOOR).all()


def test_known_singular_values_and_image_level_centring():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    m = q[:, :3] @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(relative_log_singular_values(m), torch.tensor([0.0, -math.log(2), -math.log(4)], dtype=torch.float64))
    # Image representations spread along one direction around a large common offset: centred rank 1.
    g = torch.Generator().manual_seed(2)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    reps = rnd(1, 5) * 100 + rnd(8, 1) * rnd(1, 5)
    spec = image_spectrum(reps)
    assert spec.shape == (5,)
    assert spec[0].item() == 0.0 and (spec[1:] < FLOOR).all()
    assert (image_spectrum(reps, center=False)[1:] > FLOOR).any()  # uncentred, the offset adds a direction


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_fourier_pure_frequencies(grid):
    gh, gw = grid
    r = torch.arange(gh).view(gh, 1).expand(gh, gw)
    c = torch.arange(gw).view(1, gw).expand(gh, gw)
    offset, amp = 3.0, 0.75
    checker = ((-1.0) ** (r + c)).reshape(1, gh * gw, 1)
    channels = torch.tensor([1.0, -2.0])  # amplitudes are averaged over channels; both scale alike
    feats = (offset + amp * checker) * channels.abs().view(1, 1, 2) * torch.ones(2, 1, 1)
    delta, profile = fourier_relative_log_amplitude(feats, grid)
    # DC amplitude offset*h*w, Nyquist amplitude amp*h*w: their log ratio, whatever the grid.
    assert delta == pytest.approx(math.log(amp / offset), abs=1e-9)
    assert profile[0].item() == 0.0 and profile.shape == (min(gh, gw) // 2 + 1,)
    # A constant map has no energy above DC: the highest frequency sits at the floor.
    const_delta, _ = fourier_relative_log_amplitude(torch.ones(1, gh * gw, 3), grid)
    assert const_delta < FLOOR


def test_fourier_diagonal_profile_of_a_cosine():
    h = w = 8
    r = torch.arange(h).view(h, 1).double()
    c = torch.arange(w).view(1, w).double()
    # cos(2 pi (r + c) / 8): all its energy at frequency (1, 1), split between (1, 1) and (-1, -1).
    signal = 2.0 + torch.cos(2 * math.pi * (r + c) / h)
    _, profile = fourier_relative_log_amplitude(signal.reshape(1, h * w, 1), (h, w))
    assert profile[1].item() == pytest.approx(math.log(0.5 / 2.0), abs=1e-9)
    assert (profile[2:] < FLOOR).all()


# ------------------------------------------------------------------------------- curvature

def _quadratic(eigs, seed=0):
    """loss(w) = 0.5 w^T A w over two parameter tensors, A = Q diag(eigs) Q^T."""
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    w1 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    w2 = torch.zeros(n - 2, 1, dtype=torch.float64, requires_grad=True)

    def loss_fn():
        w = torch.cat([w1, w2.flatten()])
        return 0.5 * w @ a @ w

    return a, q, [w1, w2], loss_fn


def test_hvp_equals_matrix_vector_product():
    a, _, params, loss_fn = _quadratic([5.0, 3.0, 1.0, 0.5, -0.2])
    v = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hv = hvp(loss_fn, params, [v[:2], v[2:].view(3, 1)])
    torch.testing.assert_close(torch.cat([hv[0], hv[1].flatten()]), a @ v)


def test_power_iteration_finds_known_top_eigenvalues():
    eigs = [5.0, 3.0, 1.0, 0.5, -0.2]
    _, q, params, loss_fn = _quadratic(eigs)
    values, vectors = top_eigenvalues(loss_fn, params, k=2, max_iter=300, tol=1e-10,
                                      generator=torch.Generator().manual_seed(0))
    assert values == pytest.approx([5.0, 3.0], rel=1e-6)
    for i, vec in enumerate(vectors):
        flat = torch.cat([vec[0], vec[1].flatten()])
        assert abs(float(flat @ q[:, i])) == pytest.approx(1.0, abs=1e-5)


def test_hutchinson_trace():
    # Diagonal Hessian: every Rademacher sample gives the trace exactly.
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    d = torch.tensor([2.0, -1.0, 0.5, 7.0], dtype=torch.float64)
    tr, _ = hutchinson_trace(lambda: 0.5 * (d * w * w).sum(), [w], 5, generator=torch.Generator().manual_seed(0))
    assert tr == pytest.approx(float(d.sum()), rel=1e-12)
    # Dense Hessian: an unbiased estimate, within a few standard errors of the trace.
    eigs = [5.0, 3.0, 1.0, 0.5, -0.2]
    _, _, params, loss_fn = _quadratic(eigs, seed=4)
    tr, se = hutchinson_trace(loss_fn, params, 400, generator=torch.Generator().manual_seed(1))
    assert se > 0
    assert abs(tr - sum(eigs)) < 4 * se


def test_loss_landscape_on_a_quadratic_and_params_restored():
    eigs = [4.0, 1.0, 0.5]
    _, q, params, loss_fn = _quadratic(eigs, seed=5)
    with torch.no_grad():
        params[0].copy_(torch.tensor([0.0, 0.0], dtype=torch.float64))
    d1 = [q[:2, 0].clone(), q[2:, 0].view(1, 1).clone()]
    d2 = [q[:2, 1].clone(), q[2:, 1].view(1, 1).clone()]
    coords, losses = loss_landscape_2d(loss_fn, params, d1, d2, radius=2.0, steps=5)
    a, b = torch.meshgrid(coords, coords, indexing="ij")
    torch.testing.assert_close(losses, 0.5 * (eigs[0] * a ** 2 + eigs[1] * b ** 2))
    assert all(float(p.detach().abs().sum()) == 0.0 for p in params)


# ------------------------------------------------------------------------------- on a ViT

def _tiny_vit(seed=0, **kw):
    from fastmask.models import create_vit

    torch.manual_seed(seed)
    cfg = dict(patch_size=4, img_size=16, embed_dim=24, depth=2, num_heads=2, num_classes=3)
    cfg.update(kw)
    return create_vit("vit_tiny", **cfg).eval()


def test_recorder_matches_the_models_own_attention_and_block_outputs():
    model = _tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    seen_attn, seen_feat = {}, {}
    with LayerRecorder(model, lambda i, a: seen_attn.setdefault(i, a), lambda i, f: seen_feat.setdefault(i, f)):
        model.forward_features(x)
    assert sorted(seen_attn) == sorted(seen_feat) == [0, 1]
    # The same matrices through the model's explicit path (returned by each block) and block outputs by hand.
    tokens = model.embed(x)
    for i, block in enumerate(model.blocks):
        tokens, matrix = block(tokens, return_attn_matrix=True)
        torch.testing.assert_close(seen_attn[i], matrix.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen_feat[i], tokens)
    assert seen_attn[0].shape == (2, 2, 17, 17)
    # Hooks are gone after the block.
    assert all(not b._forward_hooks and not b.attn._forward_pre_hooks for b in model.blocks)


def test_attention_matrix_rejects_non_timm_attention():
    with pytest.raises(ValueError, match="qkv"):
        attention_matrix(torch.nn.Linear(4, 4), torch.randn(1, 2, 4))


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3).eval()


def test_vit_hvp_under_math_attention_matches_finite_differences():
    """Double backward through a real ViT (explicit math attention) agrees with central
    differences of its gradient, in float64 (timm's explicit path keeps the input dtype)."""
    model = _timm_vit().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2])
    params = list(model.parameters())
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    with math_attention(model):
        assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
        hv = hvp(loss_fn, params, v)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))  # restored
    eps = 1e-6  # central differences converge as eps^2 here: ~1e-8 relative error at 1e-6

    def grad_at(sign):
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(sign * eps * vi)
        g = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.sub_(sign * eps * vi)
        return g

    fd = [(gp - gm) / (2 * eps) for gp, gm in zip(grad_at(1.0), grad_at(-1.0))]
    for a, b in zip(hv, fd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fastmask_vit_hvp_under_math_attention_matches_timm():
    """fastmask's MaskedViT (its fused attention has no double backward) gives the same
    Hessian-vector products under math_attention as the timm ViT it was converted from."""
    import copy

    from fastmask.models import convert_timm_vit

    reference = _timm_vit()
    masked = convert_timm_vit(copy.deepcopy(reference))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    names = [n for n, _ in reference.named_parameters()]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (_, p) in enumerate(reference.named_parameters())]
    results = []
    for model in (reference, masked):
        own = dict(model.named_parameters())
        params = [own[n] for n in names]
        with math_attention(model):
            results.append(hvp(lambda: torch.nn.functional.cross_entropy(model(x), y), params, v))
    assert not any(m.explicit_attention for m in masked.modules() if hasattr(m, "explicit_attention"))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_analyze_models_reports_every_measure_per_layer():
    models = {"a": _tiny_vit(0), "b": _tiny_vit(1, num_classes=0)}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    cfg = AnalysisConfig(power_iters=5, trace_samples=3, landscape_steps=3, probe_steps=10, progress=False)
    out = analyze_models(models, batches, cfg)
    json.dumps(out)  # JSON-ready
    for name, res in out["models"].items():
        assert res["depth"] == 2 and res["num_images"] == 8 and res["grid_size"] == [4, 4]
        for key in ("attention_distance", "attention_entropy", "attention_nmi"):
            assert len(res[key]["per_head"]) == 2 and all(len(h) == 2 for h in res[key]["per_head"])
        ent = torch.tensor(res["attention_entropy"]["per_head"])
        assert (ent >= 0).all() and (ent <= math.log(17) + 1e-9).all()
        nmi = torch.tensor(res["attention_nmi"]["per_head"])
        assert (nmi >= 0).all() and (nmi <= 1).all()
        assert len(res["token_spectrum"]["relative_log_sigma"][0]) == 16
        assert len(res["image_spectrum"]["relative_log_sigma"][1]) == 7
        assert len(res["fourier"]["profile"][0]) == 3
        hess = res["hessian"]
        assert len(hess["top_eigenvalues"]) == 2 and math.isfinite(hess["trace"])
        assert torch.tensor(hess["landscape"]["loss"]).shape == (3, 3)
        # The centre of the landscape is the unperturbed loss.
        assert hess["landscape"]["loss"][1][1] == pytest.approx(hess["loss"], rel=1e-5)


# ------------------------------------------------------------------------------- the CLI

def test_cli_writes_json_and_figures_for_two_checkpoints(tmp_path):
    """Two tiny checkpoints: a timm-style state dict and the teacher inside a (hand-built) driver
    checkpoint of a Masked-Distillation run, analysed side by side on built-in data."""
    from fastmask.analysis.plots import FIGURES
    from fastmask.config import ModelConfig, TeacherConfig, TrainConfig, config_to_dict
    from fastmask.methods.maskdistill import MaskDistill, MaskDistillConfig

    plain = tmp_path / "plain.pth"
    torch.save(_tiny_vit(0).state_dict(), plain)
    cfg = TrainConfig(model=ModelConfig(arch="vit_tiny", patch_size=4, img_size=16, depth=2, embed_dim=24, num_heads=2))
    cfg.method_name = "maskdistill"
    cfg.method = MaskDistillConfig(teacher=TeacherConfig(arch="vit_tiny", depth=3, embed_dim=32, num_heads=2),
                                   mask_min_patches=2)
    with pytest.warns(UserWarning):
        method = MaskDistill(cfg, num_classes=3)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"method": method.state_dict(), "config": config_to_dict(cfg), "step": 0}, run / "checkpoint.pt")

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastmask.analyze", "--checkpoint", str(plain),
           "--checkpoint", f"{run / 'checkpoint.pt'}#teacher.", "--data", "builtin:shapes", "--max-batches", "2",
           "--batch-size", "6", "--power-iters", "3", "--trace-samples", "2", "--landscape-steps", "3",
           "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "explicit-math attention" in proc.stdout
    res = json.loads((out / "analysis.json").read_text())
    assert list(res["models"]) == ["plain", "run[teacher]"]
    assert res["data"]["images"] == 12 and res["data"]["img_size"] == 16
    plain_res, teacher_res = res["models"]["plain"], res["models"]["run[teacher]"]
    assert plain_res["depth"] == 2 and teacher_res["depth"] == 3 and teacher_res["embed_dim"] == 32
    assert teacher_res["source"]["prefix"] == "teacher."
    for r in (plain_res, teacher_res):
        assert len(r["attention_distance"]["mean"]) == r["depth"]
        assert len(r["fourier"]["delta_log_amplitude"]) == r["depth"]
        assert len(r["hessian"]["top_eigenvalues"]) == 2 and "trace" in r["hessian"]
    for name in FIGURES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 5000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_file_without_vit_weights(tmp_path):
    from fastmask.analysis.loading import load_vit_for_analysis

    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="patch_embed"):
        load_vit_for_analysis(str(bad))
    with pytest.raises(FileNotFoundError):
        load_vit_for_analysis(str(tmp_path / "missing.pth"))


@pytest.mark.gpu
def test_gpu_measures_and_curvature_match_cpu():
    """On a GPU the model's own attention is the fused kernel (no double backward): the statistics
    and the Hessian-vector products must still come out as on the CPU reference."""
    import copy

    from fastmask.analysis import analyze_model

    cpu_model = _tiny_vit(0)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0]))]
    cfg = AnalysisConfig(measures=("attention", "spectrum", "fourier"), progress=False)
    ref = analyze_model(cpu_model, batches, cfg)
    got = analyze_model(gpu_model, [(x.cuda(), y.cuda()) for x, y in batches], cfg)
    for key in ("attention_distance", "attention_entropy", "attention_nmi"):
        torch.testing.assert_close(torch.tensor(got[key]["per_head"]), torch.tensor(ref[key]["per_head"]),
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got["fourier"]["profile"]), torch.tensor(ref["fourier"]["profile"]),
                               rtol=1e-3, atol=1e-3)
    x, y = batches[0]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(cpu_model.parameters())]
    results = []
    for model, dev in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        xd, yd = x.to(dev), y.to(dev)
        with math_attention(model):
            hv = hvp(lambda: torch.nn.functional.cross_entropy(model(xd), yd), list(model.parameters()),
                     [t.to(dev) for t in v])
        results.append([h.cpu() for h in hv])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
