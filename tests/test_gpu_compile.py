"""Every Triton kernel compiles for the H200 (sm_90) at every launch configuration, checked on the CPU.

The interpreter tests prove the kernels compute the right thing; they never lower them to PTX.
``tests/compile_for_gpu.py`` (see its docstring) compiles them to cubins against an sm_90 target
without a GPU; it runs here in a subprocess because TRITON_INTERPRET, which conftest sets for this
process, decides how ``@triton.jit`` wraps a kernel when its module is imported.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launched_kernels():
    """Names of the @triton.jit entry points in kernels/ (device helpers are not compiled alone)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names.update(re.findall(r"^def (_\w+_kernel)\(", path.read_text(), flags=re.M))
    return names


def _nvidia_backend_missing():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - a triton build without the NVIDIA backend
        return f"triton has no NVIDIA backend here ({exc})"
    return None


_NO_NVIDIA_BACKEND = _nvidia_backend_missing()


@pytest.mark.slow
@pytest.mark.skipif(_NO_NVIDIA_BACKEND is not None, reason=str(_NO_NVIDIA_BACKEND))
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.environ.get("FASTMASK_TEST_TRITON_CACHE", str(tmp_path / "triton-cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_for_gpu.py"), "--arch", "90", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"compile for sm_90 failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    summary = re.search(r"sm_90: compiled (\d+) specialisations of (\d+) kernels \(([^)]*)\)", proc.stdout)
    assert summary, proc.stdout
    compiled = set(summary.group(3).split(", "))
    assert compiled == _launched_kernels(), f"not compiled: {_launched_kernels() - compiled}"
    assert int(summary.group(1)) >= 150  # every dtype / head dim / constexpr branch, not one case each


@pytest.mark.slow
@pytest.mark.skipif(_NO_NVIDIA_BACKEND is not None, reason=str(_NO_NVIDIA_BACKEND))
def test_every_op_has_no_graph_break_on_the_gpu_code_path(tmp_path):
    """torch.compile traces each op as on the H200: backend triton, GPU tiles, operators decomposed into
    their wrap_triton launches (compiled for sm_90, run nowhere); ``compile_for_gpu.graph_breaks`` is
    the helper that model-level tests use for the same count."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.environ.get("FASTMASK_TEST_TRITON_CACHE", str(tmp_path / "triton-cache"))
    env.pop("FASTMASK_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_for_gpu.py"), "--graph-breaks"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    counts = json.loads(proc.stdout.strip().splitlines()[-1])["graph_breaks"]
    assert counts == {op: 0 for op in ("gather_tokens", "scatter_tokens", "apply_mask_token", "random_masking",
                                       "random_keep", "topk_tokens", "cls_attention_mask", "attention")}
