"""Shared fixtures for the pytest-benchmark suites in bench/.

Run one suite and keep its numbers, e.g.::

    .venv/bin/python -m pytest bench/bench_token_gather.py --benchmark-json bench/results/token_gather-$(hostname).json

Every benchmark is timed with the device synchronised inside the timed call, and puts what it
measured beside the timing in ``benchmark.extra_info`` (GB/s, ratios, shapes), so the JSON is
self-describing.  Kernel backends are only timed on a GPU: the Triton interpreter's CPU timings
mean nothing, so those cases skip with a reason on a CPU machine.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def timed(fn):
    """Wrap ``fn`` so each call waits for the device: pytest-benchmark then times real work."""

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync()
        return out

    return run


def measure_copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    if HAS_CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        sync()
        seconds = start.elapsed_time(end) / 1e3 / repeats
    else:
        import time

        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = (time.perf_counter() - t0) / repeats
    return 2 * nbytes / seconds / 1e9


@pytest.fixture(scope="session")
def copy_bandwidth_gbs() -> float:
    return measure_copy_bandwidth(1 << 28 if HAS_CUDA else 1 << 26)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


def need_gpu(what: str = "kernel timings"):
    """Skip (with the reason shown by -rs) when no GPU: interpreter timings are not measurements."""
    if not HAS_CUDA:
        pytest.skip(f"{what} need a CUDA device; the Triton interpreter's CPU times mean nothing")


def pytest_configure(config):
    os.environ.setdefault("FASTMASK_BACKEND", "")
