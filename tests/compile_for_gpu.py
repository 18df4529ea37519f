"""Compile every Triton kernel of ``fastmask.kernels`` for a real GPU target, on a machine without one.

The CPU test suite runs the kernels in Triton's interpreter, which never lowers them to PTX: a kernel
that the interpreter runs can still fail to compile for the GPU (an op with no lowering, a dtype mix
that only the compiler rejects, a tile that overflows shared memory).  This script closes that gap
without a GPU.  It replaces Triton's active driver by one that only names a target (``sm_90`` by
default), turns every kernel launch into a compile to a cubin (ptxas included) that launches nothing,
and calls the real launchers at ViT shapes, every dtype and every constexpr branch, on CPU tensors:
the same code path, argument specialisation and tile choice as on the GPU.  Autotuned kernels are
compiled in every config for one case and in their first config for the others; a config that needs
more shared memory than the target has is reported (the autotuner prunes it at run time) and a case
with no config that fits is an error.

    python tests/compile_for_gpu.py [--arch 90 [80 ...]] [--all-configs] [--quiet]

Prints one line per compiled kernel and exits non-zero on the first failure.  ``TRITON_INTERPRET``
must not be set (it is removed here before triton is imported).  ``tests/test_gpu_compile.py`` runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Opt-in dynamic shared memory per block (bytes), from the CUDA programming guide's compute
# capability table: what a kernel may use at most on each architecture.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Per multiprocessor (same table): registers, resident warps and blocks, shared memory, and the
# shared memory the driver reserves per block.  Used for the estimated occupancy of each config.
SM_LIMITS = {80: (65536, 64, 32, 167936, 1024), 86: (65536, 48, 16, 102400, 1024),
             89: (65536, 48, 24, 102400, 1024), 90: (65536, 64, 32, 233472, 1024)}


def _cuobjdump() -> str:
    from triton.backends.nvidia import compiler as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def resource_usage(kernel, arch: int, num_warps: int) -> dict:
    """Registers, local memory (spills), stack and shared memory of a compiled kernel, read off its
    cubin with cuobjdump; the matrix instructions its PTX uses; the estimated occupancy (resident
    warps / the maximum) that registers and shared memory allow on ``arch``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {key.lower(): int(val) for key, val in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    ptx = kernel.asm["ptx"]
    regs, shared = usage.get("reg", 0), kernel.metadata.shared
    max_regs, max_warps, max_blocks, sm_shared, reserved = SM_LIMITS.get(arch, SM_LIMITS[90])
    warp_regs = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = max_regs // max(1, warp_regs * num_warps)
    by_shared = sm_shared // (shared + reserved)
    blocks = min(by_regs, by_shared, max_warps // num_warps, max_blocks)
    return {
        "registers": regs, "local_bytes": usage.get("local", 0), "stack_bytes": usage.get("stack", 0),
        "shared_bytes": shared, "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
        "tma": ptx.count("cp.async.bulk.tensor"), "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        "occupancy": round(blocks * num_warps / max_warps, 4),
        "limited_by": "registers" if blocks == by_regs else "shared" if blocks == by_shared else "warps",
    }


class _TargetOnlyDriver:
    """Enough of a Triton driver for compiling: a device index, a stream handle and a target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


class Compiler:
    """Patches Triton so that a launch compiles (and records) instead of running."""

    def __init__(self, arch: int, all_configs: bool, quiet: bool):
        self.arch, self.all_configs, self.quiet = arch, all_configs, quiet
        self.target = GPUTarget("cuda", arch, 32)
        self.max_shared = MAX_SHARED.get(arch)
        self.records = []  # (kernel, constexprs, num_warps, num_stages, shared bytes, seconds)
        self.resources = []  # one dict per compile: the record's fields plus resource_usage()
        self.too_big = []
        self._fits = {}  # (kernel, specialisation key) -> fits in shared memory
        self._full_case = True  # autotuned kernels: every config for the first case only
        self._autotuning = False
        self._last_fits = True

    def install(self):
        driver.set_active(_TargetOnlyDriver(self.target))
        compiler = self

        def _do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
            compiler.compile(fn, key, signature, device, constexprs, options, attrs)
            return None  # JITFunction.run then returns before the launch

        def _autotuned_run(tuner, *args, **kwargs):
            # The configs the autotuner would time for this call (after its early pruning, e.g. by dtype).
            tuner.nargs = dict(zip(tuner.arg_names, args))
            try:
                pruned = tuner.prune_configs(kwargs)
            finally:
                tuner.nargs = None
            configs = pruned if (compiler.all_configs or compiler._full_case) else pruned[:1]
            fits = 0
            compiler._autotuning = True
            try:
                for config in configs:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
                    fits += compiler._last_fits
            finally:
                compiler._autotuning = False
            if not fits:
                raise RuntimeError(f"{tuner.fn.__name__}: none of {len(configs)} autotune configs fits in "
                                   f"{compiler.max_shared} bytes of shared memory on sm_{compiler.arch}")

        JITFunction._do_compile = _do_compile
        Autotuner.run = _autotuned_run

    def compile(self, fn, key, signature, device, constexprs, options, attrs):
        seen = (fn.fn.__name__, str(key))
        if seen in self._fits:
            self._last_fits = self._fits[seen]
            return
        # This compiler's own target, not the one each kernel cached on its first launch: with
        # several --arch in one process, that cache still names the first architecture.
        start = time.perf_counter()
        kernel = fn.compile(fn.ASTSource(fn, signature, constexprs, attrs), target=self.target, options=options.__dict__)
        seconds = time.perf_counter() - start
        assert kernel.metadata.target.arch == self.arch, (kernel.metadata.target, self.arch)
        shared = kernel.metadata.shared
        consts = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if fn.params[k[0]].is_constexpr}
        record = (fn.fn.__name__, consts, options.num_warps, options.num_stages, shared, seconds)
        self.records.append(record)
        first_ptr = next((t for t in signature.values() if isinstance(t, str) and t.startswith("*")), "")
        self.resources.append({"kernel": record[0], "dtype": first_ptr.lstrip("*"), "num_warps": record[2],
                               "num_stages": record[3],
                               **{k: getattr(v, "value", v) for k, v in consts.items()
                                  if isinstance(getattr(v, "value", v), (int, float, str, bool))},
                               **resource_usage(kernel, self.arch, options.num_warps)})
        fits = self.max_shared is None or shared <= self.max_shared
        self._fits[seen] = self._last_fits = fits
        if not self.quiet:
            note = "" if fits else f"  > {self.max_shared} B: pruned at run time"
            res = self.resources[-1]
            print(f"sm_{self.arch} {record[0]:<24} warps={record[2]} stages={record[3]} shared={shared:>6} B "
                  f"regs={res['registers']:>3} local={res['local_bytes']} wgmma={res['wgmma']} "
                  f"mma.sync={res['mma_sync']} occ={res['occupancy']:.2f} "
                  f"{seconds:5.1f} s  {_short(consts)}{note}", flush=True)
        if not fits:
            if not self._autotuning:
                raise RuntimeError(f"{record[0]} needs {shared} bytes of shared memory; sm_{self.arch} has "
                                   f"{self.max_shared}: it would fail at launch ({_short(consts)})")
            self.too_big.append(record)


def _short(consts):
    return " ".join(f"{k}={getattr(v, 'value', v)}" for k, v in consts.items())


# ------------------------------------------------------------------------------------------- the cases

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fastmask_ops():
    """torch.ops.fastmask with fastmask's operators registered: the cases call them with
    backend "triton", the path (schema, autograd, launcher) a GPU run takes."""
    import fastmask.library  # noqa: F401  (registers the operators)

    return torch.ops.fastmask


def token_cases():
    """Gather (with and without the fused positional embedding), scatter (mask-token fill or zeros),
    mask-token replacement, their backwards, and the Philox random keep at ViT and long rows."""
    from fastmask.kernels import token_gather as tg

    op = _fastmask_ops()
    tg._gpu_launch = lambda device: True  # the GPU tile shapes, from CPU tensors
    B, N = 2, 196
    ids = torch.arange(0, N, 4).expand(B, -1).contiguous()  # K = 49
    for dtype in DTYPES:
        for D in (768, 390):
            x = torch.zeros(B, N, D, dtype=dtype, requires_grad=True)
            pos = torch.zeros(1, N, D, dtype=dtype, requires_grad=True)
            fill = torch.zeros(D, dtype=dtype, requires_grad=True)
            op.gather_tokens(x, ids, pos, "triton").sum().backward()
            op.gather_tokens(x, ids, None, "triton").sum().backward()
            kept = torch.zeros(B, ids.shape[1], D, dtype=dtype, requires_grad=True)
            op.scatter_tokens(kept, ids, N, fill, "triton").sum().backward()
            op.scatter_tokens(kept, ids, N, None, "triton").sum().backward()
            mask = torch.zeros(B, N, dtype=torch.bool)
            op.apply_mask_token(x, mask, fill, "triton").sum().backward()
    for n in (196, 784, 4096):
        op.random_keep(torch.ones(1, dtype=torch.int64), B, n, n // 4, "triton")


def topk_cases():
    """Top-k selection (32- and 16-bit keys, both orders) and AttMask masks in every mode, gated or not."""
    from fastmask.kernels import topk_mask as tk

    op, seed = _fastmask_ops(), torch.ones(1, dtype=torch.int64)
    B = 2
    for dtype in DTYPES:
        for n in (196, 784, 1024):
            scores = torch.zeros(B, n, dtype=dtype)
            for largest in (True, False):
                op.topk_tokens(scores, n // 2, largest, "triton")
            # Counts from per-row ratios (float32 or float64, read in the kernel) or one count for every
            # row: every combination at one shape, one per (mode, gate) elsewhere (compiles are slow).
            ratios = (None, torch.full((B,), 0.25), torch.full((B,), 0.25, dtype=torch.float64))
            every = dtype == torch.float32 and n == 196
            for m, mode in enumerate(tk.MODES):
                for g, mask_prob in enumerate((1.0, 0.5)):  # ungated, gated
                    for i in range(3) if every else ((m + g) % 3,):
                        ratio, show = ratios[i], (ratios[(i + 1) % 3] if mode == "hint" else None)
                        op.cls_attention_mask(scores, ratio, 0.25, seed, mode, mask_prob, 0.1, show, 1 / 32, "triton")
            if every:  # half-precision ratios are widened to float64 in the kernel too
                half, bf16 = torch.full((B,), 0.25, dtype=torch.float16), torch.full((B,), 0.25, dtype=torch.bfloat16)
                op.cls_attention_mask(scores, half, 0.0, seed, "hint", 1.0, 0.1, bf16, 0.0, "triton")


def sdist_cases():
    """Self-distillation loss: block partials and student gradient, every dtype with two teacher views
    (DINO/iBOT CLS form), bf16 with one (the masked patch form)."""
    from fastmask.kernels import sdist_loss as sd

    sd._gpu_launch = lambda device: True
    B, K = 2, 8192
    for dtype, G, V in ((torch.float32, 2, 12), (torch.float16, 2, 12), (torch.bfloat16, 2, 12), (torch.bfloat16, 1, 1)):
        s, t, c = torch.zeros(V * B, K, dtype=dtype), torch.zeros(G * B, K, dtype=dtype), torch.zeros(K)
        sd.partial_stats(s, t, c, B, 10.0, 25.0)
        sd.grad_student(s, t, c, torch.zeros(V * B), torch.zeros(G * B), torch.zeros(G, V, B), 10.0, 25.0,
                        torch.empty_like(s))


def attention_cases(compiler: Compiler):
    """Forward with and without the CLS export, and the backward, for head dims 32/64/80/128 and every
    dtype (float32 as IEEE and as TF32).  bf16 / Dh 64 / L 197 (the ViT-S/B case) runs every autotune config."""
    from fastmask.kernels import cls_row as cr

    op = _fastmask_ops()
    first = True
    # (dtype, TF32 allowed, head dims): fp16 shares bf16's code but for the dot's input type.
    cases = ((torch.bfloat16, False, (64, 32, 128, 80)), (torch.float16, False, (64,)),
             (torch.float32, False, (64, 32, 128, 80)), (torch.float32, True, (64, 128)))
    for dtype, tf32, head_dims in cases:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for head_dim in head_dims:
            for export in (True, False):
                compiler._full_case = first
                first = False
                q, k, v = (torch.zeros(2, 3, 197, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
                out = op.attention(q, k, v, head_dim**-0.5, export, 1, "triton")[0]
                out.sum().backward()
                if export and not tf32:  # the CLS-row kernel that SDPA candidates run beside
                    cr.cls_row(q.detach(), k.detach(), head_dim ** -0.5, 1)
                    q12 = torch.zeros(2, 12, 197, head_dim, dtype=dtype)  # ViT-B's 12 heads: another BLOCK_H
                    cr.cls_row(q12, q12, head_dim ** -0.5, 1)
    torch.backends.cuda.matmul.allow_tf32 = False


def attention_config_cases(compiler: Compiler):
    """Every shipped attention autotune config, for each matrix unit (bf16 MMA, TF32 MMA, float32 FMA),
    at head dims 64 (ViT-S/B) and 128 (the largest tile; 80 pads to it), forward with and without the
    CLS export and the backward, at L = 197: what the sm_90 quality test checks config by config."""
    op = _fastmask_ops()
    compiler._full_case = True
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, True), (torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for head_dim in (64, 128):
            for export in (True, False):
                q, k, v = (torch.zeros(2, 3, 197, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
                out = op.attention(q, k, v, head_dim**-0.5, export, 1, "triton")[0]
                if export:  # one backward per (dtype, head dim): it does not depend on the export
                    out.sum().backward()
    torch.backends.cuda.matmul.allow_tf32 = False


# ------------------------------------------------------------------- the GPU code path under torch.compile

@contextlib.contextmanager
def gpu_code_path(arch: int = 90):
    """Run fastmask's ops on CPU tensors as they run on a GPU, for tracing without one.

    Inside: Triton launches compile for ``sm_<arch>`` and launch nothing (``Compiler``), the backend
    choice picks ``triton`` for CPU tensors as it does for CUDA tensors, the launchers use the GPU
    tile shapes, and ``fastmask::*`` operators decompose into their ``wrap_triton`` launches under
    ``torch.compile`` (the interpreter is off in this process).  So ``torch._dynamo.explain`` and
    ``torch.compile(fullgraph=True)`` trace exactly the code an H200 run traces; the outputs are
    garbage (nothing runs).  Use from a process that imported triton without ``TRITON_INTERPRET``
    (this module removes it on import), e.g. ``python tests/compile_for_gpu.py --graph-breaks``.
    """
    import fastmask  # noqa: F401  (registers the operators)
    from fastmask import _backend, library
    from fastmask.kernels import token_gather as tg

    assert not library._INTERPRET, "import this module before fastmask (TRITON_INTERPRET must be unset)"
    compiler = Compiler(arch, all_configs=False, quiet=True)
    compiler._full_case = False  # autotuned kernels: their first config only
    compiler.install()
    saved = (_backend.AVAILABLE["triton"], _backend.triton_interpret, tg._gpu_launch)
    _backend.AVAILABLE["triton"] = (True, f"target-only sm_{arch} driver: compiles launches, runs nothing")
    _backend.triton_interpret = lambda: True  # CPU tensors may take the triton backend
    tg._gpu_launch = lambda device: True
    try:
        yield
    finally:
        _backend.AVAILABLE["triton"], _backend.triton_interpret, tg._gpu_launch = saved


def graph_breaks(fn, *args, **kwargs) -> int:
    """Graph breaks ``torch.compile`` meets in ``fn(*args, **kwargs)`` (``torch._dynamo.explain``)."""
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(*args, **kwargs).graph_break_count
    finally:
        torch._dynamo.reset()


def op_calls():
    """One call of each public op as a masked ViT step makes it (backend chosen as on a GPU)."""
    from fastmask import ops

    B, N, D, H, Dh = 2, 196, 64, 2, 32
    x = torch.zeros(B, N, D, requires_grad=True)
    pos = torch.zeros(1, N, D)
    token = torch.zeros(D, requires_grad=True)
    ids = torch.arange(0, N, 4).expand(B, -1).contiguous()
    mask = torch.zeros(B, N, dtype=torch.bool)
    attn = torch.rand(B, N)
    ratio = torch.full((B,), 0.3)
    q = torch.zeros(B, H, N + 1, Dh, requires_grad=True)

    def loss(out):
        return sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point())

    return {
        "gather_tokens": lambda: loss(ops.gather_tokens(x, ids, pos_embed=pos)),
        "scatter_tokens": lambda: loss(ops.scatter_tokens(x[:, :49], ids, N, token)),
        "apply_mask_token": lambda: loss(ops.apply_mask_token(x, mask, token)),
        "random_masking": lambda: loss(ops.random_masking(x, 0.75, pos_embed=pos).x_kept),
        "random_keep": lambda: ops.random_keep(B, N, 0.5).mask,
        "topk_tokens": lambda: ops.topk_tokens(attn, 98),
        "cls_attention_mask": lambda: ops.cls_attention_mask(attn, ratio, mode="hint", mask_prob=0.5, show_ratio=0.05),
        "attention": lambda: loss(ops.attention(q, q, q, return_cls_attn=True)),
    }


def gpu_path_graph_breaks(compile_ops=("gather_tokens", "cls_attention_mask")) -> dict:
    """{op: graph breaks} on the GPU code path; the ops in ``compile_ops`` are also compiled with
    ``torch.compile(fullgraph=True, backend="aot_eager")`` (Triton launches traced via wrap_triton,
    each compiled for the target) and their backward run."""
    from fastmask import _backend

    counts = {}
    with gpu_code_path():
        for name, call in op_calls().items():
            assert _backend.select(name if name != "random_keep" else "random_keep", torch.device("cpu")) in (
                "triton", "cuda"), name
            counts[name] = graph_breaks(call)
            if name in compile_ops:
                torch._dynamo.reset()
                out = torch.compile(call, backend="aot_eager", fullgraph=True)()
                if out.requires_grad:
                    out.backward()
                torch._dynamo.reset()
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config for every case")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--only", nargs="+", choices=("token", "topk", "sdist", "attention", "attention-configs"),
                        default=None,
                        help="compile only these kernel families")
    parser.add_argument("--report", default=None, help="write every compile's resource usage to this JSON file")
    parser.add_argument("--graph-breaks", action="store_true",
                        help="print the graph breaks of each op on the GPU code path as JSON, compile nothing else")
    args = parser.parse_args(argv)
    if args.graph_breaks:
        print(json.dumps({"graph_breaks": gpu_path_graph_breaks()}))
        return
    families = args.only or ("token", "topk", "sdist", "attention")
    report = {}
    start = time.perf_counter()
    total = 0
    for arch in args.arch:
        compiler = Compiler(arch, args.all_configs, args.quiet)
        compiler.install()
        if "token" in families:
            token_cases()
        if "topk" in families:
            topk_cases()
        if "sdist" in families:
            sdist_cases()
        if "attention" in families:
            attention_cases(compiler)
        if "attention-configs" in families:
            attention_config_cases(compiler)
        total += len(compiler.records)
        report[f"sm_{arch}"] = compiler.resources
        kernels = sorted({r[0] for r in compiler.records})
        print(f"sm_{arch}: compiled {len(compiler.records)} specialisations of {len(kernels)} kernels "
              f"({', '.join(kernels)}); {len(compiler.too_big)} autotune configs over the shared-memory limit")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    print(f"ok: {total} compiles in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
