"""The engine's data parallelism on the CPU (gloo): optimizer-step time with 1 and 2 processes
(weak scaling: 16 images per process; ratio = 2-process / 1-process step time, 1.0 is ideal) and
the share of DDP's gradient all-reduce hidden under the backward pass, from a profiler trace of
two steps (bench/engine_step.py writes it and its summary).

Methods: DINO (AttMask-High, one backward) and MaskSub (two backwards, the first one local).
A 6-block ViT-Tiny-width student on 32 px crops, one thread per process.  On a 2-core machine the
2 processes and gloo's threads share the cores, so the ratio measures contention as much as the
engine; on GPUs the same numbers come from ``--nproc_per_node`` GPUs.

    .venv/bin/python -m pytest bench/bench_engine.py --benchmark-json bench/results/engine-cpu.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = os.path.join(REPO, "bench", "engine_step.py")
ENV = dict(os.environ, FASTMASK_BACKEND="torch", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)


def _run(cmd):
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("method", ["dino", "masksub"])
def test_engine_step_time_and_allreduce_overlap(benchmark, method, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    trace = tmp_path / f"trace-{method}.json"
    _run([sys.executable, STEP, str(one), "--method", method])

    def two_processes():
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", STEP, str(two),
              "--method", method, "--profile", str(trace)])

    benchmark.pedantic(two_processes, rounds=1, iterations=1)  # the launch; the step times come from inside
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    summary = r2["trace"]
    assert summary["allreduce_calls"] > 0 and 0.0 <= summary["overlap_fraction"] <= 1.0
    benchmark.extra_info.update({
        "method": method,
        "per_process_batch": r1["per_rank_batch"],
        "step_s_1proc": round(r1["step_s_median"], 4),
        "step_s_2proc": round(r2["step_s_median"], 4),
        "step_time_ratio_2_over_1": round(r2["step_s_median"] / r1["step_s_median"], 3),
        "images_per_s_1proc": round(r1["global_batch"] / r1["step_s_median"], 1),
        "images_per_s_2proc": round(r2["global_batch"] / r2["step_s_median"], 1),
        "trace_summary": summary,
    })
