"""Shared fixtures for the pytest-benchmark suites in bench/.

Run one suite and keep its numbers, e.g.::

    .venv/bin/python -m pytest bench/bench_token_gather.py --benchmark-json bench/results/token_gather-$(hostname).json

Every benchmark is timed with the device synchronised inside the timed call, and puts what it
measured beside the timing in ``benchmark.extra_info`` (GB/s, ratios, shapes), so the JSON is
self-describing.  Kernel backends are only timed on a GPU: the Triton interpreter's CPU timings
mean nothing, so those cases skip with a reason on a CPU machine.
"""
import os
import sys

import pytest
import torch

from common import DEVICE, HAS_CUDA, measure_copy_bandwidth

# The test helpers (e.g. ``helpers.launched_kernels``) serve the benchmarks too.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


@pytest.fixture(scope="session")
def copy_bandwidth_gbs() -> float:
    return measure_copy_bandwidth(1 << 28 if HAS_CUDA else 1 << 26)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
