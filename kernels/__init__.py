"""Triton kernels, installed as ``fastmask.kernels``.

One op family per file: the ``@triton.jit`` kernels, their launchers and the autograd Functions side
by side.  Users call ``fastmask.ops``, which checks inputs and picks the backend; the functions here
assume valid input.  Files: ``token_gather`` (gather/scatter/random masking/mask token),
``cls_attention`` (flash attention that exports the CLS map), ``topk_mask`` (top-k and AttMask masks).
"""


# Host-side integer helpers for the launchers.  ``triton.next_power_of_2`` and ``triton.cdiv`` are
# constexpr functions that cost about 2 us per host call (measured with Triton 3.8), paid on every
# launch of ops that are launch-bound at training sizes; these cost 0.1 us.

def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-int(a) // int(b))
