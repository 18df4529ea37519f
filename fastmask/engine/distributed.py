"""Data parallelism on PyTorch's engines: the process group from torchrun's environment, DDP
(bucketed all-reduce overlapped with the backward) and FSDP2 (``fully_shard`` per block)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._cli import UsageError, one_line
from ..config import ConfigError

__all__ = ["DistInfo", "Trainables", "init_distributed", "resolve_device", "broadcast_module", "wrap_ddp",
           "shard_fsdp", "check_ranks_in_sync", "check_on_every_rank", "EveryRankUsageError", "fail_together",
           "barrier", "shutdown"]

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # initialised here, so destroyed here

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> DistInfo:
    """The process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl on GPUs, gloo on the CPU; a single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    use_cuda = torch.cuda.is_available() and device_pref.lower() != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, True)


def resolve_device(pref: str, local_rank: int) -> torch.device:
    pref = pref.lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={pref} was asked for but no CUDA device is visible")
    if pref == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(pref)


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (ranks are seeded alike; this makes drift impossible)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.state_dict().values()):
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, src=0)


class Trainables(nn.Module):
    """The modules a method trains, as one module whose ``forward`` is the method's training step.

    DDP wraps this rather than each network: its reducer then sees every forward of the step (iBOT
    runs the student on global and local crops before one backward), finds from the returned loss
    the parameters a step leaves unused (a mask token), and never touches frozen or EMA teachers
    (not in here, and without gradients).  Backwards a method runs inside the step (MaskSub's main
    branch) happen before DDP prepares its reducer, so they only accumulate locally; the reducer
    averages the accumulated gradients, bucket by bucket while the driver's final backward runs.
    """

    def __init__(self, method: nn.Module):
        super().__init__()
        self.parts = nn.ModuleDict({(k or "method"): m for k, m in method.trainable_modules().items()})
        object.__setattr__(self, "method", method)  # not a child: only the trained modules are synced

    def forward(self, batch, state):
        return self.method.training_step(batch, state)


def wrap_ddp(method: nn.Module, bucket_mb: float) -> DistributedDataParallel:
    # device_ids=None: the step's inputs (batch, StepState) are already on this process' device.
    return DistributedDataParallel(
        Trainables(method), device_ids=None, bucket_cap_mb=bucket_mb, find_unused_parameters=True,
        broadcast_buffers=False)  # buffers that matter (DINO's centre) are reduced by the method itself


# Methods a fastmask ViT is entered through besides forward(): FSDP must unshard around them too.
_ENTRY_METHODS = ("forward_features", "embed", "forward_cls")


def _register_entries(module: nn.Module, register) -> None:
    """Let FSDP unshard ``module`` around its entry methods, at the outermost call only.

    ``forward_features`` calls ``embed``, and ``forward`` calls ``forward_features``: FSDP's hooks
    around an inner call would reshard the parameters the outer call still needs, so a call made
    while the module is already inside forward or an entry runs the plain method."""
    depth = [0]

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
    for name in _ENTRY_METHODS:
        plain = getattr(type(module), name, None)
        if not callable(plain):
            continue
        register(module, name)
        hooked = module.__dict__[name]

        def entry(*args, _plain=plain.__get__(module), _hooked=hooked, **kwargs):
            if depth[0]:
                return _plain(*args, **kwargs)
            enter()
            try:
                return _hooked(*args, **kwargs)
            finally:
                leave()

        module.__dict__[name] = entry


def shard_fsdp(method: nn.Module, mixed_precision: bool) -> int:
    """FSDP2 ``fully_shard`` of every network of the method, trained or frozen (the EMA teacher is
    sharded like its student, so the EMA runs shard by shard on the same slices): each transformer
    block is a unit, each ViT a unit (its embeddings, norms, heads), each top module a unit.
    ``mixed_precision``: bf16 parameters in forward/backward, float32 gradient reduction.
    Returns the number of units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    roots = dict(method.trainable_modules())
    teacher = getattr(method, "teacher", None)
    if isinstance(teacher, nn.Module):
        roots["teacher"] = teacher
    units = 0
    for root in roots.values():
        # BatchNorm (DINO/iBOT heads with use_bn) keeps float32 statistics buffers that FSDP does
        # not cast: its own float32 unit, inputs cast to float32.
        for bn in [m for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            fully_shard(bn, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, cast_forward_inputs=True))
            units += 1
        vits = [m for m in root.modules() if isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList))]
        for vit in vits:
            for blk in vit.blocks:
                fully_shard(blk, mp_policy=mp)
                units += 1
            if vit is not root:
                fully_shard(vit, mp_policy=mp)
                units += 1
        # A frozen teacher has no backward to reshard it: reshard after its forward, also at the
        # root (FSDP keeps a root unsharded otherwise), so its EMA update sees the shards.
        fully_shard(root, mp_policy=mp, reshard_after_forward=True if root is teacher else None)
        units += 1
        for vit in dict.fromkeys(vits + [root]):
            _register_entries(vit, register_fsdp_forward_method)
    return units


@torch.no_grad()
def check_ranks_in_sync(module: torch.nn.Module, device: torch.device, world: int) -> None:
    """Every rank must hold the same parameters; a drift means a bug, so fail loudly."""
    if world <= 1:
        return
    local = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    for r, other in enumerate(gathered):
        if not torch.allclose(other, gathered[0], rtol=1e-6, atol=1e-6):
            raise RuntimeError(f"rank {r} parameters differ from rank 0 after training")


class EveryRankUsageError(UsageError):
    """A user mistake that every rank of a job raised together (``check_on_every_rank``)."""

    def __init__(self, message: str, info: DistInfo):
        super().__init__(message)
        self.info = info
        self.report_here = info.is_main  # rank 0 prints it, the others stay quiet

    def finish(self, status: int) -> None:
        """Once rank 0 has printed the error (``fastmask._cli.run``): every rank exits with
        ``status`` together.  torchrun's agent stops the other ranks as soon as one has exited,
        so a stop signal then also means ``status``."""
        signal.signal(signal.SIGTERM, lambda *_: os._exit(status))
        if dist.is_initialized():
            dist.barrier()  # rank 0 has printed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def check_on_every_rank(check: Callable[[], T], info: DistInfo) -> T:
    """``check()`` on every rank, and a barrier: no rank goes on before every rank has passed it.

    A UsageError on any rank is raised on every rank, as an EveryRankUsageError with the first
    failing rank's message (naming the rank when it is not rank 0): rank 0 alone prints it and
    every process exits with status 2.  A single process just runs ``check()``."""
    if info.world <= 1:
        return check()
    result, error = None, None
    try:
        result = check()
    except UsageError as e:
        error = one_line(e)
    errors = [None] * info.world
    dist.all_gather_object(errors, error)
    failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise EveryRankUsageError(msg if rank == 0 else f"rank {rank}/{info.world}: {msg}", info)
    return result


@contextlib.contextmanager
def fail_together(rank: int, world: int):
    """A rank that raises ends its process at once (exit status 1), after printing the error with
    its rank; it does not wait in the process group's clean-up.  Its peers, blocked in the next
    collective, then fail on the closed connection (gloo) or are stopped by torchrun's agent, which
    ends every worker of a job when one fails (nccl): every rank exits with the error, none hangs.
    An EveryRankUsageError passes through: every rank raised it, none waits."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - also KeyboardInterrupt: never leave peers waiting
        if world <= 1 or isinstance(e, SystemExit) and not e.code or isinstance(e, EveryRankUsageError):
            raise
        traceback.print_exc()
        print(f"[fastmask] rank {rank}/{world} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy a group created by :func:`init_distributed`, all ranks together."""
    if info.owns_group and dist.is_initialized():
        # A rank that destroys its group and exits while a peer is still finishing (rank 0 logs
        # after the last collective) made that peer abort with "terminate called without an active
        # exception" in about 1 of 30 two-rank gloo runs; the barrier lines them up.
        dist.barrier()
        dist.destroy_process_group()
        info.owns_group = False
