"""Many processes under torchrun: PyTorch's own engine (`torchrun` launches the processes and sets their
environment, the c10d rendezvous joins nodes, DistributedDataParallel averages gradients over NCCL on GPUs or Gloo
on CPUs). As in torchvision's reference scripts, distribution lives here and in three touch points elsewhere:

1. the data: each process trains on its slice of the same per-epoch order (`data/loaders.py`: `CachedLoader`'s
   `shard`, `ShardedSampler`) and evaluates its slice of the validation images;
2. the loop: the model runs wrapped in DDP (`wrap`; checkpoints and the bundle keep the unwrapped one, so no file
   has `module.` keys), the epoch's sums are added over processes (`sum_over`), and every decision is taken by
   all processes together (`any_rank`: a non-finite loss, a signal or too many bad images on one rank stop every
   rank after the same step);
3. the writes: global rank 0 alone makes the run folder and writes every file (`on_main` runs a function there and
   hands its result, or its error, to the others).

A single process (no torchrun) gets `SINGLE`, and each helper then does what one process would do. Importing
this module does not import torch (the workflow asks it even on prediction paths that run without torch).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from imgclf.errors import ImgclfError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "SINGLE",
    "Group",
    "RankError",
    "any_rank",
    "barrier",
    "current",
    "device_for",
    "first_of",
    "gather",
    "launched",
    "on_main",
    "setup",
    "sum_over",
    "sync_batchnorm",
    "teardown",
    "wrap",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a collective waits for the other processes. A rank that died mid-run closes its connections, which ends
# the others' waits at once; this bounds the rest (a rank stuck in a long step, a node that vanished). Generous,
# because rank 0 alone does some long work while the others wait at the next collective: the LR range test, the
# cache build of a large dataset (PyTorch's own default is 10 minutes for NCCL, 30 for Gloo).
TIMEOUT = timedelta(minutes=int(os.environ.get("IMGCLF_DIST_TIMEOUT_MINUTES", "30")))


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of a run (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, ...)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Group()


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> Group:
    """Join the process group that torchrun's environment describes, once per process; a single process gets
    `SINGLE`. CUDA processes use NCCL and one GPU each (`cuda:LOCAL_RANK`), CPU processes Gloo.

    Raises:
        ConfigError: several processes asked to share one explicitly named GPU.
    """
    if not launched():
        return SINGLE
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
        if cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(teardown)
        group = current()
        if group.is_main:
            log.info(
                "distributed: %d processes (%d per node) over %s%s",
                group.world_size,
                group.local_world_size,
                backend,
                ", one GPU each" if cuda else "",
            )
    return current()


def current() -> Group:
    """The group of this process, or `SINGLE` outside a process group."""
    if not launched():
        return SINGLE
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Group(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        backend=dist.get_backend(),
    )


def teardown() -> None:
    """Leave the process group (at exit; safe to call twice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(group: Group, device: str) -> str:
    """The device this process computes on: `cuda:LOCAL_RANK` for NCCL processes, else `device` unchanged."""
    if group.backend == "nccl":
        if device.startswith("cuda:") and device != f"cuda:{group.local_rank}":
            log.warning("train.device %s ignored: each process uses its own GPU, cuda:%d", device, group.local_rank)
        return f"cuda:{group.local_rank}"
    return device


def on_main(group: Group, function: Callable[[], T]) -> T:
    """Run `function` on global rank 0 only and give its result to every process. An error there is raised on every
    process (as the same message and exit code), so no process waits for a result that will not come."""
    if not group.enabled:
        return function()
    import torch.distributed as dist

    payload: list[Any] = [None]
    if group.is_main:
        try:
            payload[0] = ("ok", function())
        except Exception as exc:
            payload[0] = ("error", (type(exc).__name__, str(exc), getattr(exc, "exit_code", 1)))
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        name, message, exit_code = value
        raise RankError(f"{message} (raised on rank 0: {name})", exit_code)
    return value


class RankError(ImgclfError):
    """An error raised on another process of the run, re-raised here with its message and exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def barrier(group: Group) -> None:
    if group.enabled:
        import torch.distributed as dist

        dist.barrier()


def sum_over(group: Group, values: Sequence[float | int], device: torch.device) -> list[float]:
    """Each value added over every process (one all-reduce of a float64 vector); unchanged for one process."""
    if not group.enabled:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(group, device))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(group: Group, flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True on every process when `flag` is true on any of them (one all-reduce; note: a sync point)."""
    if not group.enabled:
        return bool(flag)
    import torch
    import torch.distributed as dist

    tensor = torch.as_tensor(flag, device=_collective_device(group, device)).to(torch.int32).reshape(1)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def first_of(group: Group, value: T | None) -> T | None:
    """The first non-None value over the processes in rank order (a stop reason given by one of them)."""
    if not group.enabled:
        return value
    import torch.distributed as dist

    values: list[Any] = [None] * group.world_size
    dist.all_gather_object(values, value)
    return next((v for v in values if v is not None), None)


def gather(group: Group, value: T) -> list[T]:
    """Every process's `value`, in rank order, on every process."""
    if not group.enabled:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * group.world_size
    dist.all_gather_object(values, value)
    return values


def wrap(group: Group, model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training step runs: `model` itself for one process, else DistributedDataParallel around it.
    DDP synchronises the parameters that require gradients when it is made: make it again after freezing or
    unfreezing layers (`Phases` does). `model` stays the unwrapped one for state dicts, checkpoints and the bundle,
    so no file has `module.` keys."""
    if not group.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_batchnorm(group: Group, model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics computed over every process's batch (SyncBatchNorm, CUDA only): for small per-process
    batches. The model with its BatchNorm layers replaced (same parameters and buffers)."""
    if not group.enabled:
        return model
    if device.type != "cuda":
        log.warning("train.sync_batchnorm needs CUDA devices; each process keeps its own BatchNorm statistics")
        return model
    from torch import nn

    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _collective_device(group: Group, device: torch.device) -> torch.device:
    """Where a collective's tensor lives: NCCL reduces CUDA tensors only (this process's GPU, whatever `device` the
    caller had at hand), Gloo CPU ones."""
    import torch

    if group.backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
