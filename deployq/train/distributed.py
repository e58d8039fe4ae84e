"""Multi-process runs under ``torchrun``: process-group setup, sharding, and merged calibration.

    torchrun --nproc_per_node=4 -m deployq.cli.train train --recipe qat.yaml

``torchrun`` starts the processes and sets ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``; deployq
only joins the process group it describes (NCCL on CUDA, gloo on CPU) and never manages
processes itself. Every rank calibrates on its own shard of the data; :func:`all_reduce_observers`
(the ``reduce=`` hook of :func:`deployq.qat.calibrate.calibrate`) then merges the observers' statistics so
every rank computes the same scales and zero points, as if one process had seen all batches:

* min / max observers: ``all_reduce`` with ``MIN`` / ``MAX``;
* histogram observers (percentile, mse, kl): ``MIN`` / ``MAX`` of the histogram ranges, each rank
  re-bins its counts to that common range, then ``SUM`` of the counts;
* moving-average observers: the per-rank averages weighted by their batch counts (``SUM``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deployq.qat.quantizers import FakeQuantizer


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # this Context created the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init() -> Context:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single process.

    The device is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; the backend NCCL on
    CUDA and gloo on the CPU. A process group that already exists is used as it is.
    """
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
        return Context(rank, local_rank, world, device, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Context(device=torch.device("cuda") if cuda else torch.device("cpu"))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if cuda else "gloo"
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    return Context(rank, local_rank, world, device, backend, owns_group=True)


def shutdown(ctx: Context) -> None:
    """Destroy the process group if `ctx` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(length: int, ctx: Context) -> list[int]:
    """This rank's indices of ``range(length)``: every `world_size`-th, starting at `rank`.

    Unlike DistributedSampler nothing is repeated, so sums over the shards are exact (for
    evaluation: metric sums and counts are then all-reduced).
    """
    return list(range(ctx.rank, length, ctx.world_size))


def all_reduce_sums(values: Sequence[float], ctx: Context) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64); identity in a single process."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def broadcast_buffers(module: nn.Module, ctx: Context) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, which each rank updates
    from its own batches), so that all ranks hold the same model, as the checkpoint does."""
    if not ctx.distributed:
        return
    for buffer in module.buffers():
        if buffer.dtype != torch.bool:
            dist.broadcast(buffer, src=0)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


class ProcessGroupReducer:
    """:class:`deployq.qat.statistics.StatisticsReducer` over ``torch.distributed.all_reduce``.

    Arrays travel as float64 on the collective's device (CUDA for NCCL), so min / max of float32
    statistics are exact and every rank receives bit-identical results.
    """

    def __init__(self, device: torch.device, group: Optional[dist.ProcessGroup] = None) -> None:
        self.device = device
        self.group = group

    def _all_reduce(self, values: np.ndarray, op: dist.ReduceOp) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.cpu().numpy()

    def min(self, values: np.ndarray) -> np.ndarray:
        return self._all_reduce(values, dist.ReduceOp.MIN)

    def max(self, values: np.ndarray) -> np.ndarray:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def sum(self, values: np.ndarray) -> np.ndarray:
        return self._all_reduce(values, dist.ReduceOp.SUM)


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_observers(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """Merge the statistics of every observing activation quantizer of `model` over all ranks.

    Pass it to :func:`deployq.qat.calibrate.calibrate` as ``reduce=``; it runs after the local pass and
    before the statistics become qparams. Quantizers are visited in module order, the same on
    every rank. Returns how many observers were merged (0 outside a multi-process run).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    reducer = ProcessGroupReducer(_collective_device(group), group)
    merged = 0
    for module in getattr(model, "module", model).modules():
        if isinstance(module, FakeQuantizer) and not module.is_weight and module.mode == "observe":
            module.observer.reduce(reducer, module.channels)
            merged += 1
    return merged
