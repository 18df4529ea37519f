"""Bad op inputs: the same behaviour on every backend, and no crash with value checks off.

Every backend gets the same bad inputs (bench/fuzz_bad_inputs.py's table, run in-process here on
the backends that can run) and must give the same exception type and message, or the same
documented result (NaN rows from NaN inputs; zero rows / dropped writes for out-of-range ids when
value checks are off).  The Triton kernels used to segfault the process on such ids: that case runs
in a subprocess that must not die with a signal.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastmask import ops
from helpers import KERNEL_BACKENDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("torch",) + KERNEL_BACKENDS

sys.path.insert(0, os.path.join(REPO, "bench"))
import fuzz_bad_inputs as fuzz  # noqa: E402

CASES, DATA = fuzz._cases()


def _outcome(fn, backend, off):
    try:
        if off:
            with ops.value_checks(False):
                return "result", fn(ops, backend)
        return "result", fn(ops, backend)
    except Exception as e:  # noqa: BLE001
        return "error", (type(e).__name__, str(e))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_every_backend_behaves_the_same_and_clearly(index):
    name, needle, kind, fn = CASES[index]
    seen = {}
    for backend in BACKENDS:
        outcome, detail = fuzz.classify(name, needle, kind, fn, backend, DATA)
        assert outcome == "clear", f"{backend}: {outcome}: {detail}"
        seen[backend] = _outcome(fn, backend, kind.startswith("off"))
    first = seen[BACKENDS[0]]
    for backend, other in seen.items():
        assert other[0] == first[0], (backend, other, first)
        if first[0] == "error":
            assert other[1] == first[1], f"{backend} says {other[1]}, {BACKENDS[0]} says {first[1]}"
        else:
            a, b = first[1], other[1]
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(y, x, equal_nan=True, rtol=1e-4, atol=1e-5)


def test_error_messages_are_one_line_and_name_the_argument():
    for name, needle, kind, fn in CASES:
        if kind != "error":
            continue
        outcome, detail = _outcome(fn, "torch", False)
        assert outcome == "error" and detail[0] in ("ValueError", "TypeError"), (name, detail)
        assert needle in detail[1] and "\n" not in detail[1], (name, detail)


_CHILD = r"""
import os, sys, torch
os.environ.setdefault("TRITON_INTERPRET", "1")
from fastmask import ops
B, N, D, K = 2, 197, 40, 49
x = torch.randn(B, N, D)
ids = torch.stack([torch.randperm(N)[:K] for _ in range(B)])
for bad in (N, 2 ** 40, -1, -(2 ** 40), 2 ** 62):
    ids_bad = ids.clone(); ids_bad[1, 7] = bad
    with ops.value_checks(False):
        out = ops.gather_tokens(x, ids_bad, backend=sys.argv[1])
        back = ops.scatter_tokens(out, ids_bad, N, backend=sys.argv[1])
        pos = ops.gather_tokens(x, ids_bad, pos_embed=torch.randn(N, D), backend=sys.argv[1])
    assert bool((out[1, 7] == 0).all()) and bool((back[1].abs().sum(-1) > 0).sum() == K - 1), bad
    x_req = x.clone().requires_grad_(True)
    with ops.value_checks(False):
        ops.gather_tokens(x_req, ids_bad, backend=sys.argv[1]).sum().backward()
    assert int((x_req.grad[1].abs().sum(-1) > 0).sum()) == K - 1
print("survived")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_with_value_checks_off_never_crash(backend):
    """Was exit 139 (SIGSEGV) on the Triton interpreter: ids far outside [0, N) with checks off."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, backend], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by signal {-proc.returncode}): {proc.stderr[-1500:]}"
    assert "survived" in proc.stdout


def test_seeds_outside_64_bits_are_rejected_not_aliased():
    x = torch.randn(2, 9, 4)
    a = ops.random_masking(x, 0.5, seed=5).ids_keep
    assert torch.equal(a, ops.random_masking(x, 0.5, seed=5).ids_keep)
    ops.random_masking(x, 0.5, seed=2 ** 64 - 1)  # the largest seed is fine
    for bad in (2 ** 64, 2 ** 64 + 5, -1):
        with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*64\)"):
            ops.random_masking(x, 0.5, seed=bad)
    with pytest.raises(TypeError, match="seed must be an int"):
        ops.random_masking(x, 0.5, seed=1.5)
