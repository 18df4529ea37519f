"""Process-group set-up from torchrun's environment and the collectives the engine needs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = ["DistInfo", "init_distributed", "resolve_device", "broadcast_module", "all_reduce_grads",
           "check_ranks_in_sync", "barrier", "shutdown"]


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


def all_reduce_grads(params: List[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks after every backward of the step, flattened into few buckets."""
    if world <= 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket, size, cap = [], 0, 25 * 2 ** 20
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= cap):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


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
