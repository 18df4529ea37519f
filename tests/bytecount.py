"""Count the bytes an op path moves through device memory, on the CPU (imported as ``bytecount``).

``count_bytes(call)`` runs ``call()`` and returns ``{"triton": ..., "torch": ..., "total": ..., "launches": [...]}``:
- every Triton kernel (run by the interpreter, ``TRITON_INTERPRET=1``) counts each distinct byte it
  loads and each distinct byte it stores once per launch: the traffic of a kernel whose re-reads
  hit in cache, i.e. what its access pattern costs at best;
- every other ATen op counts the bytes of its tensor inputs plus its outputs (an elementwise op or
  a reduction reads its inputs once and writes its outputs once); ops that only make views or
  allocate count nothing.
Host-side copies that the interpreter makes of kernel arguments are left out.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import _disable_current_modes

from helpers import LAUNCH_NOTHING, SeeAtenOps, patched

_NO_TRAFFIC = LAUNCH_NOTHING | {"reshape", "permute", "_reshape_alias", "unbind", "split", "chunk", "view_as", "size",
                                "stride", "is_same_size", "sym_size", "sym_stride", "sym_numel", "_to_copy_noop"}


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


class _Accesses:
    def __init__(self):
        self.loads = {}   # element size -> list of address arrays
        self.stores = {}

    def add(self, table, ptrs, mask):
        addrs = np.asarray(ptrs).reshape(-1)
        m = np.asarray(mask).reshape(-1) if mask is not None else None
        if m is not None:
            if m.size == 1 and addrs.size > 1:
                m = np.broadcast_to(m, addrs.shape)
            addrs = addrs[m.astype(bool)]
        return addrs

    def total(self) -> int:
        total = 0
        for table in (self.loads, self.stores):
            for size, chunks in table.items():
                if chunks:
                    total += size * np.unique(np.concatenate(chunks)).size
        return total


def count_bytes(call):
    from triton.runtime import interpreter as interp

    launches = []
    torch_bytes = [0]
    current = []

    builder = interp.InterpreterBuilder
    real_load, real_store = builder.create_masked_load, builder.create_masked_store
    real_run = interp.InterpretedFunction.run

    def elem_size(ptrs) -> int:
        return ptrs.get_element_ty().primitive_bitwidth // 8

    def load(self, ptrs, mask, other, *args, **kwargs):
        if current:
            acc = current[-1]
            acc.loads.setdefault(elem_size(ptrs), []).append(acc.add(None, ptrs.data, mask.data))
        return real_load(self, ptrs, mask, other, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        if current:
            acc = current[-1]
            acc.stores.setdefault(elem_size(ptrs), []).append(acc.add(None, ptrs.data, mask.data))
        return real_store(self, ptrs, value, mask, *args, **kwargs)

    def run(self, *args, **kwargs):
        current.append(_Accesses())
        try:
            with _disable_current_modes():
                return real_run(self, *args, **kwargs)
        finally:
            acc = current.pop()
            launches.append((f"triton:{self.fn.__name__}", acc.total()))

    def count(name, args, kwargs, out):
        if name in _NO_TRAFFIC:
            return
        outs = sum(_tensor_bytes(o) for o in _flat(out if isinstance(out, (list, tuple)) else [out]))
        if name in ("zero_", "fill_", "zeros", "zeros_like", "full", "ones_like", "new_zeros", "new_full"):
            moved = outs  # a fill writes its output and reads nothing
        else:
            moved = sum(_tensor_bytes(a) for a in _flat(list(args) + list(kwargs.values()))) + outs
        torch_bytes[0] += moved
        launches.append((name, moved))

    with patched(builder, create_masked_load=load, create_masked_store=store), \
            patched(interp.InterpretedFunction, run=run), SeeAtenOps(count):
        result = call()
    triton_bytes = sum(b for n, b in launches if n.startswith("triton:"))
    return {"triton": triton_bytes, "torch": torch_bytes[0], "total": triton_bytes + torch_bytes[0],
            "launches": launches, "result": result}
