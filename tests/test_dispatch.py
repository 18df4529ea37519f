"""Measured dispatch (fastmask.dispatch), tested on the CPU with injected timings.

Measuring is enabled for CPU tensors here (``measure_devices=("cpu",)``) and the timer is a fake that
runs each candidate once (so every candidate path is exercised for real) and returns a given time.
"""
import json
import os

import pytest
import torch
import torch._dynamo

from fastmask import dispatch, ops, reference
from helpers import TOL


class FakeTimer:
    def __init__(self, seconds):
        self.seconds = dict(seconds)
        self.calls = []

    def __call__(self, name, fn):
        self.calls.append(name)
        fn()  # the candidate really runs (forward, or forward + backward)
        value = self.seconds[name]
        if isinstance(value, Exception):
            raise value
        return value


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Install a dispatcher that measures CPU calls with a fake timer; yields a factory."""
    monkeypatch.delenv("FASTMASK_BACKEND", raising=False)
    monkeypatch.delenv("FASTMASK_DISPATCH", raising=False)
    path = str(tmp_path / "dispatch.json")
    installed = []

    def make(seconds, path=path):
        timer = FakeTimer(seconds)
        disp = dispatch.Dispatcher(path=path, timer=timer, measure_devices=("cpu",))
        installed.append(dispatch.set_dispatcher(disp))
        return timer, disp

    yield make
    dispatch.set_dispatcher(installed[0])


def _spy_backends(monkeypatch):
    """Record which backend each token-op call ran (the registered operator's backend argument)."""
    from fastmask import library

    ran = []
    real = library.gather_tokens

    def spy(*args):
        ran.append(args[-1])
        return real(*args)

    monkeypatch.setattr(library, "gather_tokens", spy)
    return ran


def _inputs(B=2, N=197, D=40, K=98):
    x = torch.randn(B, N, D)
    ids = torch.sort(torch.randperm(N)[:K].expand(B, -1).contiguous(), dim=1).values
    return x, ids


def test_fastest_candidate_is_chosen_and_runs(measured, monkeypatch):
    timer, disp = measured({"triton": 2e-6, "torch": 1e-6})
    ran = _spy_backends(monkeypatch)
    x, ids = _inputs()
    out = ops.gather_tokens(x, ids)
    assert sorted(timer.calls) == ["torch", "triton"]
    assert ran[-1] == "torch"  # the timed runs first, then the chosen one
    torch.testing.assert_close(out, reference.gather_tokens(x, ids, None))
    ((fp, table),) = disp.report().items()
    ((key, entry),) = table.items()
    assert key.startswith("gather_tokens(float32[2x197x40], int64[2x98]") and not key.endswith("+grad")
    assert entry == {"choice": "torch", "seconds": {"triton": 2e-6, "torch": 1e-6}}
    assert ops.backends()["dispatch"] == disp.report()


def test_slower_reference_keeps_the_kernel(measured, monkeypatch):
    timer, _ = measured({"triton": 1e-6, "torch": 3e-6})
    ran = _spy_backends(monkeypatch)
    x, ids = _inputs()
    ops.gather_tokens(x, ids)
    assert ran[-1] == "triton"


def test_choice_is_cached_in_memory_and_in_the_file(measured, tmp_path, monkeypatch):
    timer, disp = measured({"triton": 2e-6, "torch": 1e-6})
    x, ids = _inputs()
    ops.gather_tokens(x, ids)
    ops.gather_tokens(x, ids)
    assert len(timer.calls) == 2  # measured once for the key
    data = json.loads((tmp_path / "dispatch.json").read_text())
    assert data["version"] == dispatch.CACHE_VERSION
    assert data["fingerprint"] == dispatch.fingerprint(torch.device("cpu"))
    assert [e["choice"] for e in data["choices"].values()] == ["torch"]
    # A new process (a fresh dispatcher on the same file) reads the choice instead of measuring.
    timer2, _ = measured({"triton": 1e-6, "torch": 5e-6})
    ran = _spy_backends(monkeypatch)
    ops.gather_tokens(x, ids)
    assert timer2.calls == [] and ran == ["torch"]
    # Another shape is another key: measured.
    ops.gather_tokens(*_inputs(K=1))
    assert sorted(timer2.calls) == ["torch", "triton"]


def test_new_device_or_version_invalidates_the_file(measured, monkeypatch):
    timer, _ = measured({"triton": 2e-6, "torch": 1e-6})
    x, ids = _inputs()
    ops.gather_tokens(x, ids)
    real = dispatch.fingerprint
    monkeypatch.setattr(dispatch, "fingerprint", lambda device: real(device).replace("torch ", "torch 9.9-"))
    timer2, _ = measured({"triton": 1e-6, "torch": 2e-6})
    ran = _spy_backends(monkeypatch)
    ops.gather_tokens(x, ids)
    assert sorted(timer2.calls) == ["torch", "triton"] and ran[-1] == "triton"


def test_corrupt_or_old_cache_file_is_ignored(measured, tmp_path):
    (tmp_path / "dispatch.json").write_text("{not json")
    timer, _ = measured({"triton": 2e-6, "torch": 1e-6})
    ops.gather_tokens(*_inputs())
    assert len(timer.calls) == 2
    data = json.loads((tmp_path / "dispatch.json").read_text())
    data["version"] = -1
    (tmp_path / "dispatch.json").write_text(json.dumps(data))
    timer2, _ = measured({"triton": 2e-6, "torch": 1e-6})
    ops.gather_tokens(*_inputs())
    assert len(timer2.calls) == 2


def test_forcing_measures_nothing(measured, monkeypatch):
    timer, _ = measured({"triton": 1.0, "torch": 1e-6})
    ran = _spy_backends(monkeypatch)
    x, ids = _inputs()
    ops.gather_tokens(x, ids, backend="triton")
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    ops.gather_tokens(x, ids)
    assert timer.calls == [] and ran == ["triton", "triton"]
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    monkeypatch.setenv("FASTMASK_DISPATCH", "static")
    monkeypatch.delenv("FASTMASK_BACKEND")
    ops.gather_tokens(x, ids)  # measuring switched off: the static order (triton here)
    assert timer.calls == [] and ran[-1] == "triton"


def test_failing_candidate_is_dropped(measured, monkeypatch):
    timer, disp = measured({"triton": RuntimeError("no kernel image for this device"), "torch": 3e-6})
    ran = _spy_backends(monkeypatch)
    ops.gather_tokens(*_inputs())
    assert ran[-1] == "torch"
    ((_, table),) = disp.report().items()
    assert list(table.values())[0]["seconds"]["triton"] is None


def test_grad_keys_time_the_backward_on_private_leaves(measured):
    timer, disp = measured({"triton": 1e-6, "torch": 2e-6})
    x, ids = _inputs()
    x.requires_grad_(True)
    pos = torch.randn(1, 197, 40, requires_grad=True)
    out = ops.gather_tokens(x, ids, pos_embed=pos)
    assert x.grad is None and pos.grad is None  # timing did not touch the caller's leaves
    out.sum().backward()
    ref_x = torch.zeros_like(x)
    ref_x.scatter_(1, ids[..., None].expand(-1, -1, 40), 1.0)
    torch.testing.assert_close(x.grad, ref_x)
    ((_, table),) = disp.report().items()
    assert list(table)[0].endswith("+grad")
    with torch.no_grad():
        ops.gather_tokens(x, ids, pos_embed=pos)  # no grad: another key
    assert len(timer.calls) == 4


@pytest.mark.parametrize("return_cls_attn", [False, True])
def test_attention_candidates_agree_with_the_reference(measured, return_cls_attn):
    timer, disp = measured({"triton": 2e-6, "torch": 1e-6})
    q, k, v = (torch.randn(2, 3, 37, 24) for _ in range(3))
    res = ops.attention(q, k, v, return_cls_attn=return_cls_attn)
    ref = reference.attention(q, k, v, None, return_cls_attn, 1)
    if return_cls_attn:
        torch.testing.assert_close(res[1], ref[1], **TOL[torch.float32])
        res, ref = res[0], ref[0]
    torch.testing.assert_close(res, ref, **TOL[torch.float32])
    assert sorted(timer.calls) == ["torch", "triton"]


def test_sdpa_candidates_with_the_cls_row_kernel(monkeypatch):
    """The SDPA+CLS-row path (what CUDA candidates run) equals the reference on the CPU as well."""
    monkeypatch.delenv("FASTMASK_BACKEND", raising=False)
    q, k, v = (torch.randn(2, 6, 50, 32, dtype=torch.bfloat16) for _ in range(3))
    from fastmask import library

    out, cls, _ = library._torch_attention(q, k, v, 32**-0.5, True, 1, sdpa_backend="MATH", cls_kernel=True)
    ref_out, ref_cls = reference.attention(q, k, v, None, True, 1)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[torch.bfloat16])


def test_traced_choice_is_a_constant_and_never_measures(measured):
    """The mechanism under torch.compile(fullgraph=True): no timing while tracing, the static default
    before any eager decision, the decided candidate after one."""
    timer, _ = measured({"add": 2e-6, "mul": 1e-6})
    runs = {"add": lambda x: x + 1, "mul": lambda x: x * 2}

    def step(x):
        name = dispatch.choose_backend("toy", "add", x.device, (x,), (), ("add", "mul"),
                                       lambda impl, x_: runs[impl](x_), (x,))
        return runs[name](x)

    x = torch.randn(4, 5)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, backend="eager", fullgraph=True)(x), x + 1)
    assert timer.calls == []
    torch.testing.assert_close(step(x), x * 2)  # eager: measured, "mul" is faster
    assert sorted(timer.calls) == ["add", "mul"]
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, backend="eager", fullgraph=True)(x), x * 2)
    assert len(timer.calls) == 2
    torch._dynamo.reset()


def test_compiled_attention_runs_the_decided_op(measured, monkeypatch):
    timer, _ = measured({"triton": 2e-6, "torch": 1e-6})
    q, k, v = (torch.randn(2, 3, 37, 24) for _ in range(3))

    def step(q, k, v):
        out, cls = ops.attention(q, k, v, return_cls_attn=True)
        return out.sum() + cls.sum()

    step(q, k, v)  # eager: decides torch (SDPA + the CLS row) over the static default triton
    assert sorted(timer.calls) == ["torch", "triton"]
    from fastmask.kernels import cls_attention

    monkeypatch.setattr(cls_attention, "attention_forward", lambda *a, **kw: pytest.fail("triton ran, torch was chosen"))
    torch._dynamo.reset()
    ref_out, ref_cls = reference.attention(q, k, v, None, True, 1)
    got = torch.compile(step, backend="eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, ref_out.sum() + ref_cls.sum(), rtol=1e-4, atol=1e-4)
    assert len(timer.calls) == 2
    torch._dynamo.reset()


def test_default_dispatcher_measures_only_cuda(monkeypatch):
    monkeypatch.delenv("FASTMASK_BACKEND", raising=False)
    disp = dispatch.Dispatcher()
    assert not disp.measuring(torch.device("cpu"))
    assert disp.measuring(torch.device("cuda")) == (os.environ.get("FASTMASK_DISPATCH", "measure") != "static")
    assert dispatch.cache_dir()
