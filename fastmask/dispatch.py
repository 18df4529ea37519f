"""Measured dispatch: time the candidates of an op once per shape on the user's device, keep the fastest.

Where a PyTorch path competes with a fastmask kernel (SDPA with its cuDNN / flash / memory-efficient
backends beside the fused Triton attention; ``torch.gather``, ``topk`` and friends beside the token and
top-k kernels), the first call for a key ``(op, shapes, dtypes, device, grad)`` runs every candidate a
few times (like Triton's autotuner), picks the fastest and remembers it: in memory, and in a small JSON
file under the user's cache directory (``$FASTMASK_CACHE_DIR`` or ``~/.cache/fastmask``), so the next
process does not measure again.  The file is keyed by a fingerprint of the device, torch, triton and
fastmask versions: any change discards the old choices.  A slow kernel on some GPU can therefore never
cost the user time, whatever the kernels' authors measured on theirs.

What is chosen is reported by ``fastmask.ops.backends()["dispatch"]`` (candidate timings and choice per
key), by a ``DEBUG`` line on the ``fastmask.dispatch`` logger, and by the benchmarks' JSON.

Rules:
- ``backend=`` / ``FASTMASK_BACKEND`` force a backend as before; nothing is measured then.
- Only CUDA devices are measured (the CPU interpreter's times mean nothing); elsewhere the static
  order of ``fastmask._backend.select`` decides.  ``FASTMASK_DISPATCH=static`` turns measuring off,
  ``FASTMASK_DISPATCH=measure`` (the default) keeps it on.
- Compile safety: the choice is made outside any traced region.  Inside ``torch.compile`` (or while a
  CUDA graph is being captured) nothing is timed: a choice made earlier (in this process or read
  from the cache file) is used, else the static default.  So compiled code sees one fixed op, and the
  decision itself is a Python constant the tracer folds.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

log = logging.getLogger("fastmask.dispatch")

CACHE_VERSION = 1
_FILE_NAME = "dispatch.json"

# A candidate's name -> a callable running it once on the call's inputs (forward, plus backward for
# keys with grad).  Callables may raise: such a candidate cannot run this call and is dropped.
Candidates = Mapping[str, Callable[[], object]]
# timer(name, fn) -> seconds per call
Timer = Callable[[str, Callable[[], object]], float]


def cache_dir() -> str:
    root = os.environ.get("FASTMASK_CACHE_DIR")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastmask")


def fingerprint(device: torch.device) -> str:
    """What a measurement depends on besides the shapes: the device and the software stack."""
    from . import __version__ as fastmask_version

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is a dependency
        triton_version = "none"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = f"{props.name}/sm_{props.major}{props.minor}/{props.multi_processor_count}sm"
    else:
        dev = device.type
    return f"{dev}|torch {torch.__version__}|triton {triton_version}|fastmask {fastmask_version}"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        dims = "x".join(str(s) for s in value.shape)
        layout = "" if value.is_contiguous() else ":strided"
        return f"{str(value.dtype).replace('torch.', '')}[{dims}]{layout}"
    return repr(value)


def make_key(op: str, *parts, grad: bool) -> str:
    """A readable cache key: the op, its tensors' dtypes/shapes/layout, flags, and grad."""
    return f"{op}({', '.join(_describe(p) for p in parts)}){'+grad' if grad else ''}"


def cuda_event_timer(name: str, fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7) -> float:
    """Median seconds per call of ``fn`` on the current CUDA stream (events; the first calls compile
    and autotune outside the timing)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@dataclass
class Decision:
    """One key's measurement: the chosen candidate and every candidate's seconds (None: it failed)."""

    choice: str
    seconds: Dict[str, Optional[float]] = field(default_factory=dict)


class Dispatcher:
    """Measures candidates per key, remembers the fastest in memory and in a JSON file.

    ``timer`` and ``measure_devices`` are injectable so that the mechanism is tested on the CPU with
    fake timings; production uses ``cuda_event_timer`` on CUDA devices only.
    """

    def __init__(self, path: Optional[str] = None, timer: Optional[Timer] = None,
                 measure_devices: Sequence[str] = ("cuda",)):
        self.path = path
        self.timer = timer or cuda_event_timer
        self.measure_devices = tuple(measure_devices)
        self._lock = threading.Lock()
        self._decisions: Dict[str, Dict[str, Decision]] = {}  # fingerprint -> key -> decision
        self._loaded: set = set()
        # (device type, index) -> key -> choice: what traced code reads (see choose).
        self._eager_choices: Dict[Tuple[str, Optional[int]], Dict[str, str]] = {}

    def _remember(self, device: torch.device, key: str, choice: str) -> None:
        self._eager_choices.setdefault((device.type, device.index), {})[key] = choice

    # ---------------------------------------------------------------- the file
    def _file(self) -> str:
        return self.path or os.path.join(cache_dir(), _FILE_NAME)

    def _load(self, fp: str) -> Dict[str, Decision]:
        if fp in self._loaded:
            return self._decisions.setdefault(fp, {})
        self._loaded.add(fp)
        table = self._decisions.setdefault(fp, {})
        try:
            with open(self._file()) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return table
        if data.get("version") != CACHE_VERSION or data.get("fingerprint") != fp:
            log.debug("dispatch cache %s is for %r; measuring again for %r", self._file(), data.get("fingerprint"), fp)
            return table
        for key, entry in data.get("choices", {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("choice"), str):
                table.setdefault(key, Decision(entry["choice"], dict(entry.get("seconds", {}))))
        return table

    def _save(self, fp: str) -> None:
        path = self._file()
        data = {"version": CACHE_VERSION, "fingerprint": fp,
                "choices": {k: {"choice": d.choice, "seconds": d.seconds} for k, d in self._decisions[fp].items()}}
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        except OSError as exc:  # a read-only home must not break training
            log.debug("dispatch cache %s not written: %s", path, exc)

    # ---------------------------------------------------------------- choosing
    def measuring(self, device: torch.device) -> bool:
        if os.environ.get("FASTMASK_DISPATCH", "measure") == "static":
            return False
        return device.type in self.measure_devices

    def lookup(self, device: torch.device, key: str) -> Optional[Decision]:
        with self._lock:
            return self._load(fingerprint(device)).get(key)

    def choose(self, key: str, device: torch.device, candidates: Candidates, default: str) -> str:
        """The candidate to run for ``key``: a remembered choice, else (when measuring is allowed and
        possible here) the fastest after timing them all, else ``default``."""
        if len(candidates) <= 1 or not self.measuring(device):
            return default
        if torch.compiler.is_compiling():
            # Traced code: a plain dict read of what eager calls decided (no locks, files or timing),
            # so the tracer folds the choice into a constant.
            known = self._eager_choices.get((device.type, device.index), {}).get(key)
            return known if known in candidates else default
        fp = fingerprint(device)
        with self._lock:
            table = self._load(fp)
            known = table.get(key)
            # Everything the cache file holds for this device becomes visible to traced code too.
            eager = self._eager_choices.setdefault((device.type, device.index), {})
            for k, d in table.items():
                eager.setdefault(k, d.choice)
        if known is not None and known.choice in candidates:
            self._remember(device, key, known.choice)
            return known.choice
        if not _may_measure():
            return default
        seconds: Dict[str, Optional[float]] = {}
        for name, fn in candidates.items():
            try:
                seconds[name] = float(self.timer(name, fn))
            except Exception as exc:  # this candidate cannot run these inputs here
                log.debug("dispatch %s: candidate %s failed (%s: %s)", key, name, type(exc).__name__, exc)
                seconds[name] = None
        timed = {n: s for n, s in seconds.items() if s is not None}
        # Ties (and equal fake timings) keep the candidates' order: the default comes first.
        choice = min(timed, key=lambda n: (timed[n], n != default)) if timed else default
        decision = Decision(choice, seconds)
        with self._lock:
            self._decisions[fp][key] = decision
            self._save(fp)
        self._remember(device, key, choice)
        log.debug("dispatch %s on %s: %s (%s)", key, fp, choice,
                  ", ".join(f"{n} {'failed' if s is None else f'{s * 1e6:.1f} us'}" for n, s in seconds.items()))
        return choice

    def report(self) -> Dict[str, Dict[str, dict]]:
        """{fingerprint: {key: {"choice": ..., "seconds": {...}}}} for everything known in this process."""
        with self._lock:
            return {fp: {k: {"choice": d.choice, "seconds": dict(d.seconds)} for k, d in table.items()}
                    for fp, table in self._decisions.items()}

    def clear(self) -> None:
        with self._lock:
            self._decisions.clear()
            self._loaded.clear()
            self._eager_choices.clear()


def _may_measure() -> bool:
    """Timing runs kernels and syncs: never while tracing or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


_DISPATCHER = Dispatcher()


def dispatcher() -> Dispatcher:
    return _DISPATCHER


def set_dispatcher(new: Dispatcher) -> Dispatcher:
    """Install another dispatcher (tests inject timings this way); returns the old one."""
    global _DISPATCHER
    old, _DISPATCHER = _DISPATCHER, new
    return old


def report() -> Dict[str, Dict[str, dict]]:
    return _DISPATCHER.report()


# --------------------------------------------------------------------------------------------
# candidate sets per op
# --------------------------------------------------------------------------------------------

def _grad_inputs(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Copies of the differentiable inputs that are leaves of a private graph: timing a candidate's
    backward must not touch the caller's autograd graph or .grad fields."""
    return tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors)


def with_backward(run: Callable[..., object], tensors: Sequence[Optional[torch.Tensor]], grad: bool) -> Callable[[], object]:
    """A timing closure: ``run(*tensors)`` without grad, or forward + backward of its first output."""
    if not grad:
        def fwd():
            with torch.no_grad():
                return run(*tensors)
        return fwd
    leaves = _grad_inputs(tensors)
    wanted = [t for t in leaves if t is not None and t.requires_grad]

    def fwd_bwd():
        res = run(*leaves)
        out = res[0] if isinstance(res, tuple) else res
        return torch.autograd.grad(out, wanted, torch.ones_like(out), allow_unused=True)
    return fwd_bwd


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forced(backend: Optional[str]) -> bool:
    """Whether the call's backend was forced (``backend=`` or ``FASTMASK_BACKEND``): then nothing is measured."""
    return bool(backend or os.environ.get("FASTMASK_BACKEND"))


def choose_backend(op: str, default: str, device: torch.device, tensors: Sequence[Optional[torch.Tensor]],
                   flags: Sequence, candidates: Sequence[str], run: Callable[..., object],
                   grad_tensors: Sequence[torch.Tensor] = ()) -> str:
    """The backend to run ``op`` with: ``default`` unless measuring picks another of ``candidates``.

    ``run(name, *grad_tensors)`` runs the op once with backend ``name`` on the call's inputs (the
    differentiable inputs passed positionally so that their backward can be timed on private leaves).
    """
    names = list(dict.fromkeys([default, *candidates]))
    disp = _DISPATCHER
    if len(names) <= 1 or not disp.measuring(device):
        return default
    grad = needs_grad(*grad_tensors)
    key = make_key(op, *[t for t in tensors if t is not None], *flags, grad=grad)
    return disp.choose(key, device, {n: with_backward(lambda *ts, n=n: run(n, *ts), grad_tensors, grad)
                                     for n in names}, default)
