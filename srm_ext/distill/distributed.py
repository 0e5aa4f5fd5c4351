"""torch.distributed helpers: process-group setup from ``torchrun``'s environment,
gradient and statistics averaging, rank-0-only side effects.

Gradients are averaged with explicit all-reduces rather than by wrapping modules
in ``DistributedDataParallel``: the trainable set changes from stage to stage
(dictionaries only, student + predictors, student only) and parts of the student
receive no gradient in stage 2, which DDP only tolerates with
``find_unused_parameters``. Averaging every gradient that exists gives the same
update as DDP at these model sizes, with one code path for all stages. As
with DDP, each stage starts from rank 0's copy of what it trains.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistributedContext", "init_distributed", "resolve_device", "shutdown_distributed"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "DistributedContext":
        """The context of an already initialised default process group, if any."""
        if dist.is_available() and dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            return cls(dist.get_rank(), dist.get_world_size(), local)
        return cls()

    def all_reduce_gradients(self, parameters: Iterable[Tensor]) -> None:
        """Average the gradients of ``parameters`` over processes (one flat all-reduce)."""
        if not self.enabled:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return

        def average(flat: Tensor) -> None:
            dist.all_reduce(flat)
            flat /= self.world_size

        _through_flat(grads, average)

    def broadcast_from_main(self, tensors: Iterable[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values, as DDP does when it wraps a
        module: averaged gradients keep replicas equal only if they start equal."""
        if not self.enabled:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        with torch.no_grad():
            # One flat copy per dtype: a single call each, and NCCL refuses
            # non-contiguous tensors such as the codeword-major dictionaries.
            for group in groups.values():
                _through_flat(group, lambda flat: dist.broadcast(flat, src=0))

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating buffers (BatchNorm running statistics) over processes so
        every rank evaluates and checkpoints the same model."""
        if not self.enabled:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world_size

    def mean(self, value: float, device: torch.device | str = "cpu") -> float:
        """Average a Python number over processes."""
        return self.sum([value], device)[0] / self.world_size

    def sum(self, values: list[float], device: torch.device | str = "cpu") -> list[float]:
        """Sum Python numbers over processes (``device``: where the backend
        reduces, a CUDA device for NCCL)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment
    (``WORLD_SIZE`` > 1): NCCL when CUDA is used, gloo otherwise. Returns a
    single-process context when not launched by ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            # Checked here as resolve_device checks a single process: the
            # process group needs its GPU before that runs.
            _require_cuda(device)
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"process {local_rank} of this node has no GPU of its own: the node has "
                    f"{torch.cuda.device_count()}; start at most that many processes per node"
                )
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext.current()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(requested: str, context: DistributedContext | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; CUDA processes of a distributed
    job take the GPU of their local rank."""
    context = context or DistributedContext()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        _require_cuda(requested)
        if device.index is None:
            device = torch.device("cuda", context.local_rank)
    return device


def _require_cuda(requested: str) -> None:
    if not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")


def _through_flat(tensors: list[Tensor], collective: Callable[[Tensor], None]) -> None:
    """Run ``collective`` in place on one flat copy of ``tensors`` (one call
    where a call per tensor would each pay the latency) and copy the result
    back into them."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
