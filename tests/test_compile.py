"""The whole training step under torch.compile: fullgraph, no graph breaks, same numbers as eager.

For every method (tiny models, ``tests/tiny_methods.py``), on the CPU with the backends that trace
without generating code (``eager``: Dynamo alone; ``aot_eager``: Dynamo + AOTAutograd, which builds
the joint forward/backward graph): the step (mask generation, forward, loss, backward) compiles
with ``fullgraph=True`` and 0 graph breaks (``torch._dynamo.explain``), gives the loss and the
gradients of the eager step, and does not recompile on the next step.  ``torch.export`` of
``MaskedViT`` with ``ids_keep``, with ``mask`` and with the CLS map.  Two calls of one compiled step
draw different masks.  One Inductor smoke test; CUDA-graph tests on a GPU only.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastmask.config import ConfigError, load_config
from fastmask.engine.compile import compile_step, count_graph_breaks, no_recompiles, resolve_compile_mode, train_step_fn
from test_train import tiny_folder, tiny_overrides  # noqa: F401  (fixture)
from tiny_methods import CASES, make_batch, make_method, make_state

pytestmark = pytest.mark.filterwarnings("ignore:.*teacher is randomly initialised")

# The methods the issue names (dino masked, iBOT + AttMask high/hint, MaskSub, MaskedKD, MaskDistill);
# DINO's drop mode is counted by explain only.
STEP_CASES = [name for name in CASES if name != "dino_drop"]


def counting_backend(backend: str = "aot_eager"):
    """A torch.compile backend that records every graph Dynamo hands it, then runs ``backend``."""
    graphs = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    return compiler, graphs


def _zero_grads(method):
    for p in method.parameters():
        p.grad = None


def _grads(method):
    return {n: p.grad for n, p in method.named_parameters() if p.grad is not None}


class RecordMasks(nn.Module):
    """Wraps a mask policy; every call also copies its mask into the buffer ``last`` (a mutation the
    compiled graph performs, so the masks of a compiled or replayed step can be read afterwards)."""

    def __init__(self, policy, batch: int, num_tokens: int, device="cpu"):
        super().__init__()
        self.policy = policy
        self.register_buffer("last", torch.zeros(batch, num_tokens, dtype=torch.bool, device=device))

    def __call__(self, *args, **kwargs):
        mask = self.policy(*args, **kwargs)
        self.last.copy_(mask)
        return mask


# ------------------------------------------------------------------------------------- config

def test_compile_option_values():
    assert [resolve_compile_mode(v) for v in ("none", "blocks", "step", "on", "off", True, False, "STEP")] == [
        "none", "blocks", "step", "step", "none", "step", "none", "step"]
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_compile_mode("graph")
    assert load_config(config="dino_tiny_builtin", overrides=["compile=true"]).compile == "step"
    assert load_config(config="dino_tiny_builtin", overrides=["compile=blocks"]).compile == "blocks"
    assert load_config(config="dino_tiny_builtin").compile == "none"
    with pytest.raises(ConfigError, match="compile"):
        load_config(config="dino_tiny_builtin", overrides=["compile=fast"])


# ------------------------------------------------------------------------------------- the step

@pytest.mark.parametrize("name", ["dino_drop", "ibot_attmask_hint"])
def test_training_step_has_no_graph_breaks(name):
    method = make_method(name)
    batch = make_batch(method)
    state = make_state()
    result = count_graph_breaks(train_step_fn(method), method.prepare_batch(batch, state), state)
    assert (result.graphs, result.breaks, result.reasons) == (1, 0, {})


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP_CASES)
def test_fullgraph_step_matches_eager(name):
    """One graph (fullgraph=True, 0 breaks) through AOTAutograd; loss, metrics, gradients and
    buffers as eager; the next step reuses the graph."""
    eager = make_method(name)
    compiled_method = copy.deepcopy(eager)
    batch = make_batch(eager)
    torch.manual_seed(5)
    loss, metrics = compile_step(eager, "none")(batch, make_state())
    backend, graphs = counting_backend()
    step = compile_step(compiled_method, "step", backend=backend)
    torch.manual_seed(5)
    loss_c, metrics_c = step(batch, make_state())
    assert len(graphs) == 1
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for key, value in metrics.items():
        torch.testing.assert_close(torch.as_tensor(metrics_c[key]).double(), torch.as_tensor(value).double(),
                                   rtol=1e-5, atol=1e-6, msg=key)
    expected, got = _grads(eager), _grads(compiled_method)
    assert got.keys() == expected.keys() and len(got) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    for (key, buf), (_, buf_c) in zip(eager.named_buffers(), compiled_method.named_buffers()):
        torch.testing.assert_close(buf_c, buf, rtol=1e-5, atol=1e-6, msg=key)  # e.g. DINO's centers
    # The next step (the driver zeroes gradients, the epoch is unchanged) reuses the graph.
    _zero_grads(compiled_method)
    with no_recompiles():
        step(batch, make_state(step=1))
    assert len(graphs) == 1


def test_two_calls_of_one_compiled_step_draw_different_masks():
    method = make_method("ibot_attmask_high", "method.mask_prob=1.0")
    batch = make_batch(method)
    n = 2 * batch[0][0].shape[0]
    method.policy = RecordMasks(method.policy, n, 16)
    step = compile_step(method, "step", backend="aot_eager")
    seen = []
    torch.manual_seed(0)
    for i in range(2):
        step(batch, make_state(step=i))
        _zero_grads(method)
        seen.append(method.policy.last.clone())
    assert not torch.equal(seen[0], seen[1])
    # Masks come from the default generator, which the driver seeds per step: reproducible.
    torch.manual_seed(0)
    step(batch, make_state())
    assert torch.equal(method.policy.last, seen[0])


@pytest.mark.slow
def test_training_steps_have_no_graph_breaks_on_the_gpu_code_path(tmp_path):
    """The same count with the ops on their GPU path (triton backend, GPU tiles, every Triton launch
    compiled for sm_90 and run nowhere: ``tests/compile_steps_for_gpu.py``), in a subprocess since
    this process runs Triton's interpreter."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton has no NVIDIA backend here")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTMASK_BACKEND")}
    env["TRITON_CACHE_DIR"] = os.environ.get("FASTMASK_TEST_TRITON_CACHE", str(tmp_path / "triton-cache"))
    proc = subprocess.run([sys.executable, str(root / "tests" / "compile_steps_for_gpu.py"), *STEP_CASES],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["graph_breaks"] == {name: 0 for name in STEP_CASES}, result["reasons"]


# ------------------------------------------------------------------------------------- export

def _tiny_vit():
    from fastmask.models import create_vit

    torch.manual_seed(0)
    return create_vit("vit_tiny", patch_size=8, img_size=32, depth=2, embed_dim=32, num_heads=2, num_classes=5).eval()


class _Features(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, ids_keep=None, mask=None):
        f = self.model.forward_features(x, ids_keep=ids_keep, mask=mask, return_cls_attn=True)
        return f.cls, f.patch, f.cls_attn


@pytest.mark.parametrize("inputs", ["ids_keep", "mask", "both"])
def test_export_masked_vit_with_cls_map(inputs):
    model = _Features(_tiny_vit())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    kwargs = {}
    if inputs in ("ids_keep", "both"):
        kwargs["ids_keep"] = torch.sort(torch.rand(2, 16, generator=g).argsort(1)[:, :6], 1).values
    if inputs in ("mask", "both"):
        kwargs["mask"] = torch.rand(2, 16, generator=g) < 0.4
    exported = torch.export.export(model, (x,), kwargs)
    # Fresh inputs of the same shapes through the exported program.
    x2 = torch.randn(2, 3, 32, 32, generator=g)
    kwargs2 = {k: v.flip(0) for k, v in kwargs.items()}
    for args in ((x, kwargs), (x2, kwargs2)):
        got, expected = exported.module()(args[0], **args[1]), model(args[0], **args[1])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert expected[2].shape == (2, kwargs["ids_keep"].shape[1] if "ids_keep" in kwargs else 16)


def test_export_classifier_returns_logits_and_cls_map():
    model = _tiny_vit()

    class Classify(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, ids_keep):
            return self.model(x, ids_keep=ids_keep, return_cls_attn=True, attn_layer=0)

    x = torch.randn(3, 3, 32, 32)
    ids = torch.arange(16).reshape(2, 8)[:1].expand(3, -1).contiguous()
    exported = torch.export.export(Classify(), (x, ids))
    logits, cls_attn = exported.module()(x, ids)
    ref_logits, ref_cls = model(x, ids_keep=ids, return_cls_attn=True, attn_layer=0)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_attn, ref_cls, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- Inductor

@pytest.mark.slow
def test_inductor_compiles_the_masked_vit_forward():
    """The one Inductor smoke test (generated C++ on the CPU, so kept to one small graph): a 1-block
    MaskedViT forward with dropped tokens and the CLS map, as MaskedKD's teacher and AttMask's teacher
    run it, equals eager."""
    from fastmask.models import create_vit

    torch.manual_seed(0)
    model = create_vit("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 2, 5, 7, 9, 11, 12, 15], [1, 3, 4, 6, 8, 10, 13, 14]])

    def forward(x, ids):
        feats = model.forward_features(x, ids_keep=ids, return_cls_attn=True)
        return feats.cls, feats.cls_attn

    with torch.no_grad():
        got = torch.compile(forward, backend="inductor", fullgraph=True)(x, ids)
        expected = forward(x, ids)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_blocks_mode_compiles_every_block_and_head_mlp():
    method = make_method("ibot_attmask_high")
    step = compile_step(method, "blocks", backend="eager")
    compiled = [m for m in method.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    # 2 blocks x (student, teacher) + 2 head MLPs
    assert len(compiled) == 6 and step.compiled is None and step.mode == "blocks"
    loss, _ = step(make_batch(method), make_state())
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------- GPU

def _cuda_ibot():
    method = make_method("ibot_attmask_high", "method.mask_prob=1.0").cuda()
    batch = make_batch(method, device="cuda")
    method.policy = RecordMasks(method.policy, 2 * batch[0][0].shape[0], 16, device="cuda")
    return method, batch


@pytest.mark.gpu
def test_cuda_graph_replay_of_an_attmask_step_draws_new_masks_without_sync():
    method, batch = _cuda_ibot()
    step = compile_step(method, "step", compile_mode="reduce-overhead")
    state = make_state(device="cuda")
    for _ in range(3):  # warm-up, record, first replay
        step(batch, state)
        _zero_grads(method)
    torch.cuda.synchronize()
    seen = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            loss, _ = step(batch, make_state(step=i, device="cuda"))
            seen.append(method.policy.last.clone())
            _zero_grads(method)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.gpu
def test_manual_cuda_graph_capture_of_an_eager_attmask_step():
    """torch.cuda.graph around the eager step (forward, loss, backward): each replay draws new masks
    (the ops read seeds the default generator draws on the device) and nothing syncs."""
    method, batch = _cuda_ibot()
    step = compile_step(method, "none")
    state = make_state(device="cuda")  # generator None: the default CUDA generator, graph-safe
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: allocations, dispatch measurements, lazy inits
            step(batch, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, _ = step(batch, state)  # gradients accumulate into the warm-up's .grad tensors
    seen = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            graph.replay()
            seen.append(method.policy.last.clone())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.gpu
def test_reduce_overhead_step_matches_the_default_mode():
    """CUDA graphs change nothing but the launches: with Inductor drawing through ATen's generator
    (fallback_random) the same seeds give the same masks, losses and gradients in both modes."""
    method, batch = _cuda_ibot()
    default = copy.deepcopy(method)
    with torch._inductor.config.patch(fallback_random=True):
        graphed = compile_step(method, "step", compile_mode="reduce-overhead")
        plain = compile_step(default, "step")
        for i in range(3):
            torch.manual_seed(i)
            loss, _ = graphed(batch, make_state(step=i, device="cuda"))
            torch.manual_seed(i)
            loss_p, _ = plain(batch, make_state(step=i, device="cuda"))
            torch.testing.assert_close(method.policy.last, default.policy.last)
            torch.testing.assert_close(loss, loss_p, rtol=1e-4, atol=1e-5)
            for key, grad in _grads(default).items():
                torch.testing.assert_close(_grads(method)[key], grad, rtol=1e-3, atol=1e-5, msg=key)
            _zero_grads(method)
            _zero_grads(default)


# ------------------------------------------------------------------------------------- the driver

@pytest.mark.slow
def test_driver_compile_step_trains_like_eager(tiny_folder, tmp_path, monkeypatch):
    """``compile=step`` through the driver (its StepState, per-step seeding, bound backward, value
    checks turned off after step 1, optimizer): 3 steps from one graph, and the parameters of an eager
    run that draws its masks where the compiled step does (the default generator, seeded per step)."""
    import dataclasses
    import fastmask.engine.loop as loop
    from fastmask.engine import compile as compile_module
    from fastmask.train import Trainer

    backend, graphs = counting_backend()

    def driver_compile_step(method, mode, **kwargs):
        step = compile_module.compile_step(method, mode, backend=backend, **kwargs)
        if mode != "none":
            return step
        return lambda batch, state: step(batch, dataclasses.replace(state, generator=None))

    monkeypatch.setattr(loop, "compile_step", driver_compile_step)
    params = {}
    for mode in ("none", "step"):
        out = tmp_path / mode
        cfg = load_config(config="dino_tiny_builtin",
                          overrides=tiny_overrides(tiny_folder, out, f"compile={mode}", "max_steps=3", "attn_images=0"))
        Trainer(cfg).fit()
        params[mode] = torch.load(out / "checkpoint.pt", weights_only=False)["method"]
    assert len(graphs) == 1
    assert params["step"].keys() == params["none"].keys()
    for key, value in params["none"].items():
        torch.testing.assert_close(params["step"][key], value, rtol=1e-4, atol=1e-5, msg=key)
