"""Counter-based random numbers shared bit-for-bit by every backend.

All randomness in fastmask's ops (random masking, AttMask gates and hint reveals) comes from
Philox-4x32-10 keyed by a 64-bit ``seed`` and indexed by a 32-bit counter ``offset``: the same
function as Triton's ``tl.randint4x(seed, offset)`` and ``csrc/philox.cuh``.  Because the stream
is a pure function of (seed, offset), the PyTorch reference, the Triton kernels and the CUDA
kernels draw identical numbers, and a run is reproducible from its seed alone.

Streams used by the ops (``lane`` is which of the four 32-bit outputs is read):
  * per token ``(b, n)``: ``offset = b * N + n``, lane 0 (random-masking noise, hint keys)
  * per row ``b``: ``offset = b``, lane 1 (AttMask gate)

The ops take the seed as a one-element int64 *tensor* on the tensors' device, which every kernel
reads itself: drawing it (``seed_tensor``) is a device op, so a captured CUDA graph draws a new
seed on each replay (PyTorch's CUDA generators advance their Philox offset per replay) and nothing
on a masked path reads a number back to the host.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

_M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57


def _mul32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` < 2**32.

    The full product needs 64 unsigned bits, which int64 cannot hold, so ``b`` is split in 16-bit halves.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return high, low


def philox4x32(seed: Union[int, torch.Tensor], offset: torch.Tensor, rounds: int = 10) -> Tuple[torch.Tensor, ...]:
    """Four uint32 streams (as int64 tensors in [0, 2**32)) for counters ``offset`` under ``seed``.

    ``seed``: an int, or a one-element int64 tensor (its 64 bits are the key, as in the kernels).
    ``offset`` must lie in [0, 2**32) (the ops build their counters in range; not checked, since a
    check would read the values back and break graph capture).
    """
    offset = offset.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=offset.device, dtype=torch.int64)
        # Two's complement: the arithmetic shift then the mask gives the high word's bits.
        k0, k1 = seed & _M32, (seed >> 32) & _M32
    else:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = offset
    c1 = torch.zeros_like(offset)
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


# How far one seed draw moves a CUDA generator's Philox offset (torch advances it in multiples of 4).
SEED_DRAW_OFFSET_STEP = 4


def seed_from_generator_state(initial_seed: int, offset: int) -> int:
    """A 31-bit op seed from a Philox generator's (seed, offset): the splitmix64 finaliser of both.

    Pure host arithmetic, so drawing a seed from a CUDA generator needs no device sync; distinct
    offsets give unrelated seeds.
    """
    x = (int(initial_seed) * 0x9E3779B97F4A7C15 + int(offset) + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFF


def draw_seed(generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> int:
    """The Philox seed of one op call: ``seed`` if given, else 31 random bits from ``generator``
    (torch's default CPU generator when None, so ``torch.manual_seed`` makes runs reproducible).

    A CUDA generator keeps its (seed, offset) on the host: the seed is derived from them and the
    offset advanced as a draw would, instead of drawing on the device and reading the number back,
    which would stall the host until the GPU has caught up (once per masked batch).
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}")
        if not 0 <= seed < 2**64:  # Philox keys on 64 bits: a larger seed would alias a smaller one
            raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type == "cuda":
        offset = generator.get_offset()
        generator.set_offset(offset + SEED_DRAW_OFFSET_STEP)
        return seed_from_generator_state(generator.initial_seed(), offset)
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())


SEED_HIGH = 2**31 - 1  # seeds drawn from generators lie in [0, SEED_HIGH), as ``draw_seed``'s always did


def traced_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """``generator``, or None inside ``torch.compile``: a ``torch.Generator`` cannot enter a traced
    graph (Dynamo breaks on it), so traced code draws from the device's default generator instead,
    which ``torch.manual_seed`` seeds (the driver seeds it every step) and which CUDA graphs replay
    with a fresh Philox offset each replay."""
    return None if torch.compiler.is_compiling() else generator


def seed_tensor(
    generator: Optional[torch.Generator] = None, seed: Optional[int] = None, device=None
) -> torch.Tensor:
    """The Philox seed of one op call as a one-element int64 tensor on ``device``, without a host sync.

    ``seed`` (an int, or already a one-element integer tensor) wins; else 31 random bits are drawn on
    the device from ``generator`` (the device's default generator when None, and inside torch.compile:
    see ``traced_generator``; ``torch.manual_seed`` makes runs reproducible).  A CPU draw gives the same seed ``draw_seed`` returned for the same
    generator state, so seeded CPU runs keep their masks.  Traceable by torch.compile (no ``.item()``)
    and replayed correctly by CUDA graphs (the draw is a device op whose Philox offset advances per replay).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            if seed.numel() != 1 or seed.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"seed as a tensor must hold one int64 value, got {seed.dtype} {tuple(seed.shape)}")
            return seed.reshape(1).to(device=device, dtype=torch.int64)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}")
        if not 0 <= seed < 2**64:  # Philox keys on 64 bits: a larger seed would alias a smaller one
            raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
        # A fill, not a host-to-device copy: nothing waits.
        return torch.full((1,), seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64, device=device)
    generator = traced_generator(generator)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        drawn = torch.randint(0, SEED_HIGH, (1,), generator=generator, device=generator.device)
        return drawn.to(device, non_blocking=True)
    return torch.randint(0, SEED_HIGH, (1,), device=device)
