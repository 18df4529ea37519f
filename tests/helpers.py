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
