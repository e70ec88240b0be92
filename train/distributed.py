"""Distributed data parallel under `torchrun`: process group, sharded sampling, replica checks.

    torchrun --standalone --nproc_per_node 2 -m flannel.cli train --manifest M.csv --out runs/ddp

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op for one process.
gloo is used on CPU and nccl on CUDA. Only rank 0 writes files; every rank draws the same
epoch-seeded permutation and takes its own shard, so a resumed run sees the same order.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group if this process was started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's boolean on every rank (early stopping is decided where validation runs)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter, in name order (equal replicas give equal digests).

    Buffers are left out: DDP broadcasts BatchNorm running statistics from rank 0 at the start of
    every forward, so after the last step each rank holds its own; rank 0's are the ones saved.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(model: nn.Module, info: DistInfo) -> list[str]:
    """Every rank's ``weights_digest``; DDP replicas must all agree."""
    digest = weights_digest(model)
    if not info.enabled:
        return [digest]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, digest)
    return out


class EpochSampler(Sampler[int]):
    """Seeded per-epoch order, optionally class-balanced, sharded across ranks.

    Args:
        targets: class index of every item.
        seed: base seed; epoch e draws with ``seed + e``.
        balanced: draw with replacement, each class equally likely (a class-balanced sampler);
            otherwise a permutation.
        info: rank and world size; every rank gets ``ceil(n / world)`` items (wrapping around).
    """

    def __init__(self, targets: Sequence[int], seed: int, balanced: bool = False,
                 info: DistInfo = DistInfo()):
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.seed, self.balanced, self.info = seed, balanced, info
        self.epoch = 0
        self.per_rank = -(-len(self.targets) // info.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.targets)
        if not self.balanced:
            return torch.randperm(n, generator=g)
        counts = torch.bincount(self.targets).float()
        weights = (1.0 / counts)[self.targets]
        return torch.multinomial(weights, n, replacement=True, generator=g)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        total = self.per_rank * self.info.world_size
        if total > len(order):
            order = torch.cat([order, order[: total - len(order)]])
        return iter(order[self.info.rank:total:self.info.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank
