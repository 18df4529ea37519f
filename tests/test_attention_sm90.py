"""Compile quality of every shipped attention autotune config for the H200 (sm_90), checked on the CPU.

``tests/compile_for_gpu.py --only attention-configs`` compiles each config of the forward, dK/dV and
dQ kernels for bf16 (16-bit MMA), float32 with TF32 and float32 without (FMA), at head dims 64 and
128, and reads registers, stack (spills), shared memory and the matrix instructions off each cubin
and its PTX.  Here every config must spill nothing and, where tensor cores are used, use wgmma only
(no ``mma.sync`` fallback).  ``bench/results/attention-sm90-configs.json`` holds the same report for
the configs before and after the Hopper tuning.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_gpu_compile import _NO_NVIDIA_BACKEND

ROOT = Path(__file__).resolve().parents[1]
DOT_KERNELS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}


def compile_report(tmp_path) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.environ.get("FASTMASK_TEST_TRITON_CACHE", str(tmp_path / "triton-cache"))
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_for_gpu.py"), "--arch", "90", "--quiet",
                           "--only", "attention-configs", "--report", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"compile for sm_90 failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(report.read_text())["sm_90"]


@pytest.mark.slow
@pytest.mark.skipif(_NO_NVIDIA_BACKEND is not None, reason=str(_NO_NVIDIA_BACKEND))
def test_every_attention_config_spills_nothing_and_uses_wgmma(tmp_path):
    from fastmask.kernels import cls_attention as ca

    records = compile_report(tmp_path)
    seen = {}
    for r in records:
        where = f"{r['kernel']} {r['dtype']} {r.get('DOT_PRECISION')} BLOCK_M={r.get('BLOCK_M')} " \
                f"BLOCK_N={r.get('BLOCK_N')} BLOCK_D={r['BLOCK_D']} warps={r['num_warps']} stages={r['num_stages']}"
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{where} spills: {r}"
        if r["kernel"] not in DOT_KERNELS:
            continue
        assert r["mma_sync"] == 0, f"{where} falls back to mma.sync: {r}"
        if r["dtype"] in ("bf16", "fp16") or r["DOT_PRECISION"] == "tf32":
            assert r["wgmma"] > 0, f"{where} does not use wgmma: {r}"
        config_class = ca._config_class({"bf16": ca.torch.bfloat16, "fp32": ca.torch.float32}[r["dtype"]],
                                        r["DOT_PRECISION"], r["BLOCK_D"])
        seen.setdefault((DOT_KERNELS[r["kernel"]], config_class), set()).add(
            (r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"]))
    # Every shipped config of the checked classes was compiled (none skipped by the pruning).
    for (kernel, config_class), shapes in seen.items():
        assert shapes == set(ca._CONFIGS[kernel][config_class]), (kernel, config_class)
    assert set(seen) == {(k, c) for k, classes in ca._CONFIGS.items() for c in classes}
