"""Bytes each token-op path moves against its minimum, forward and backward, counted on the CPU.

    TRITON_INTERPRET=1 python bench/token_bytes.py [OUT.json]

The counting and the minimums are those of tests/test_token_bytes.py (distinct bytes per Triton launch
under the interpreter plus ATen op traffic; partial-sum buffers sized by the GPU tiles), over every case
of ViT-S (D=384) / ViT-B (D=768), K = 98 / 49, with and without the positional embedding / fill / mask
token, B = 8, bf16.  Prints one line per case; with OUT.json also writes {case: {"fwd": x, "bwd": x}}.
"""
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import pytest  # noqa: E402

import test_token_bytes as t  # noqa: E402

CASES = [(op, D, K, extra) for op in ("gather", "scatter", "mask_token") for D in (384, 768) for K in (98, 49)
         for extra in ((False, True) if op != "mask_token" else (True,))]
EXTRA = {"gather": "pos", "scatter": "fill", "mask_token": "token"}


def main(out=None):
    mp = pytest.MonkeyPatch()
    t.use_gpu_partials(mp)
    results = {}
    try:
        for case in CASES:
            ratios, _, _ = t.byte_ratios(*case)
            name = f"{case[0]} D={case[1]} K={case[2]} {EXTRA[case[0]] if case[3] else 'plain'}"
            results[name] = {k: round(v, 4) for k, v in ratios.items()}
            print(name, results[name], flush=True)
    finally:
        mp.undo()
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
