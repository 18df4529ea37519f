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


def device_ms(call) -> float:
    """Median device time (ms) of ``call()`` from triton.testing.do_bench (CUDA events, L2 flushed),
    after one call outside the timing that compiles, autotunes or builds."""
    import triton.testing

    call()
    return triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")


def fastest_ms(kernel_ms, impls, *key) -> float:
    """The least ``kernel_ms(impl, *key)`` over ``impls``, leaving out the ones that raise (e.g.
    torch.compile unavailable): the other baselines still count."""
    times = []
    for impl in impls:
        try:
            times.append(kernel_ms(impl, *key))
        except Exception:
            continue
    return min(times)


def need_gpu_for(impl):
    """need_gpu(), and for fastmask_cuda also the CUDA extension: skip with the backend's reason without it."""
    need_gpu()
    if impl == "fastmask_cuda":
        from fastmask import ops

        report = ops.backends()["cuda"]
        if not report["available"]:
            pytest.skip(report["reason"])


_COMPILED = {}


def compiled(name, fn):
    """torch.compile(fn, dynamic=False), built once per name and reused by every benchmark."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]
