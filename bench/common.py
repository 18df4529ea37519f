"""Timing helpers shared by the benchmark suites (imported as ``common``)."""
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


def need_gpu(what: str = "kernel timings"):
    """Skip (with the reason shown by -rs) when no GPU: interpreter timings are not measurements."""
    if not HAS_CUDA:
        pytest.skip(f"{what} need a CUDA device; the Triton interpreter's CPU times mean nothing")
