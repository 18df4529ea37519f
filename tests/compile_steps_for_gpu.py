"""Graph breaks of every method's whole training step on the GPU code path, without a GPU.

Inside ``compile_for_gpu.gpu_code_path()`` the ops pick the ``triton`` backend for CPU tensors, use
the GPU tile shapes, and every Triton launch compiles for sm_90 and runs nothing, so Dynamo traces
the step exactly as on an H200 (the numbers it computes are garbage: nothing is checked but the
trace).  Prints ``{"graph_breaks": {method: breaks}, "reasons": {method: {reason: count}}}`` as JSON
on its last line.  Run by ``tests/test_compile.py`` in a subprocess, since ``TRITON_INTERPRET``
(which the test process sets) decides how kernels are wrapped when triton is imported.

    python tests/compile_steps_for_gpu.py [method ...]
"""
from __future__ import annotations

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compile_for_gpu  # noqa: E402  (first: it removes TRITON_INTERPRET before triton is imported)


def main(argv=None) -> None:
    from fastmask.engine.compile import count_graph_breaks, train_step_fn
    from tiny_methods import CASES, make_batch, make_method, make_state

    names = (argv if argv is not None else sys.argv[1:]) or list(CASES)
    breaks, reasons = {}, {}
    warnings.filterwarnings("ignore", message=".*teacher is randomly initialised")
    with compile_for_gpu.gpu_code_path():
        for name in names:
            method = make_method(name)
            batch = make_batch(method)
            state = make_state()
            result = count_graph_breaks(train_step_fn(method), method.prepare_batch(batch, state), state)
            breaks[name], reasons[name] = result.breaks, result.reasons
    print(json.dumps({"graph_breaks": breaks, "reasons": reasons}))


if __name__ == "__main__":
    main()
