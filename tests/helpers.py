"""Helpers shared by the test files (imported as ``helpers``; pytest puts tests/ on sys.path)."""
import contextlib

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

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


def step_state(seed=0, device="cpu", **fields):
    """The StepState of one step of a method in a unit test: one step in one epoch, lr 1e-3, no weight
    decay, teacher momentum 0, a plain ``loss.backward()``, a generator on ``device`` seeded with
    ``seed``; ``fields`` override any of these."""
    from fastmask.methods.base import StepState

    device = torch.device(device)
    defaults = dict(epoch=0, step=0, steps_per_epoch=1, total_steps=1, progress=0.0, lr=1e-3, wd=0.0,
                    teacher_momentum=0.0, backward=lambda loss: loss.backward(), device=device,
                    generator=torch.Generator(device=device).manual_seed(seed))
    return StepState(**{**defaults, **fields})


def image_batch(n, img_size, num_classes, seed=1):
    """(images [n, 3, img_size, img_size], labels [n] in [0, num_classes)), drawn in that order from
    one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img_size, img_size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def write_image_folder(root, splits, num_classes, draw, name="class{c}/{i:03d}.jpg", **save):
    """An ImageFolder tree root/<split>/<name>: for each split (name, images per class) and each class c,
    the images ``draw(rng, c)`` (uint8 [H, W, 3]) from one numpy generator seeded 0, in that order;
    ``save`` goes to PIL's ``Image.save``.  Returns str(root)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in splits:
        for c in range(num_classes):
            for i in range(n):
                path = root / split / name.format(c=c, i=i)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(draw(rng, c)).save(path, **save)
    return str(root)


# ATen ops that only make metadata or allocate: they launch no kernel on a GPU.
LAUNCH_NOTHING = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "expand",
                  "as_strided", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "alias",
                  "detach", "lift_fresh"}


class SeeAtenOps(TorchDispatchMode):
    """Calls ``on_op(name, args, kwargs, out)`` after every ATen op a call runs.  fastmask operators
    are opened up: their implementation runs under the mode, so the ops they launch are what is seen."""

    def __init__(self, on_op):
        super().__init__()
        self.on_op = on_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = OPDEFS.get(func.name().split(".")[0]) if func.namespace == "fastmask" else None
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self.on_op(func.overloadpacket.__name__, args, kwargs, out)
        return out


@contextlib.contextmanager
def patched(owner, **attributes):
    """Sets ``owner``'s attributes for the with block and puts the old ones back after it."""
    old = {name: getattr(owner, name) for name in attributes}
    for name, value in attributes.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(owner, name, value)


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

    from triton.runtime.interpreter import InterpretedFunction

    names = []
    run = InterpretedFunction.run

    def recorded_run(self, *args, **kwargs):
        names.append(f"triton:{self.fn.__name__}")
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    def record(name, args, kwargs, out):
        if name not in LAUNCH_NOTHING:
            names.append(name)

    with patched(InterpretedFunction, run=recorded_run), SeeAtenOps(record):
        call()
    return names
