"""Helpers shared by the test files (imported as ``helpers``; pytest puts tests/ on sys.path)."""
import torch

from fastmask._backend import _probe

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Backends that can run kernels here: Triton (its CPU interpreter without a GPU) and, on a GPU with
# the extension built, CUDA.
KERNEL_BACKENDS = ("triton", "cuda") if HAS_CUDA and _probe("cuda")[0] else ("triton",)

# Tolerances for results that went through one rounding to the dtype (or float32 accumulation).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def randn(*shape, dtype=torch.float32, generator=None, requires_grad=False):
    t = torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(requires_grad)


# ATen ops that only make metadata or allocate: they launch no kernel on a GPU.
_LAUNCH_NOTHING = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "expand",
                   "as_strided", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "alias",
                   "detach", "lift_fresh"}


def launched_kernels(call) -> list:
    """Names of the device kernels one ``call()`` launches.

    On a GPU: the CUDA kernels and memsets torch.profiler records.  On the CPU: the ATen ops that
    compute or fill plus the Triton kernels run by the interpreter (whose own host-side copies are
    left out), i.e. what the same call would launch on a GPU, counting an ATen op as one kernel.
    """
    if HAS_CUDA:
        from torch.profiler import ProfilerActivity, profile

        call()  # compile and allocate outside the count
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from triton.runtime.interpreter import InterpretedFunction

    from torch._library.custom_ops import OPDEFS

    names = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            opdef = OPDEFS.get(func.name().split(".")[0]) if func.namespace == "fastmask" else None
            if opdef is not None:  # a fastmask operator: count what its implementation launches
                with self:
                    return opdef._init_fn(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ not in _LAUNCH_NOTHING:
                names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def recorded_run(self, *args, **kwargs):
        names.append(f"triton:{self.fn.__name__}")
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    InterpretedFunction.run = recorded_run
    try:
        with Record():
            call()
    finally:
        InterpretedFunction.run = run
    return names
