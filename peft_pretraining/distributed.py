"""Process-group setup: one process, or torchrun's N processes (nccl on CUDA, gloo on CPU).

Multi-node is torchrun's job (`--nnodes`, rendezvous): we only read the environment it sets. `accelerate
launch --multi_gpu --num_processes N` starts its processes through torchrun's own code, so it sets the same
environment and works the same way (on CPU too); accelerate's wrappers (mixed precision, dynamo) are not used.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job and which device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(*, single_gpu: bool = False) -> DistributedContext:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE (absent: one process) and start the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if single_gpu and world_size > 1:
        raise ValueError(f"--single_gpu with {world_size} processes: launch one process "
                         "(--nproc_per_node 1) or drop --single_gpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def accelerate_launch_notes(environ: dict[str, str]) -> list[str]:
    """What to tell a user whose `accelerate launch` settings this run does not follow (we read only
    torchrun's environment): its --cpu launcher starts one process whatever --num_processes says, and its
    mixed-precision and dynamo settings apply to accelerate's wrappers, which we do not use."""
    notes = []
    if environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "WORLD_SIZE" not in environ:
        notes.append("accelerate launch --cpu starts a single process (without an MPI hostfile): for N processes "
                     "use `accelerate launch --multi_gpu --num_processes N` (works on CPU) or torchrun")
    if environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() not in ("no", ""):
        notes.append(f"accelerate's --mixed_precision {environ['ACCELERATE_MIXED_PRECISION']} is ignored: use "
                     "--dtype bfloat16 or --dtype bf16_mixed")
    if environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() not in ("no", ""):
        notes.append(f"accelerate's --dynamo_backend {environ['ACCELERATE_DYNAMO_BACKEND']} is ignored: use "
                     "--compile")
    return notes


def shutdown_distributed(ctx: DistributedContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum over ranks in place (a no-op for one process); returns the tensor for chaining."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def print0(ctx: DistributedContext, *values) -> None:
    """print on rank 0 only, so N processes do not repeat every line."""
    if ctx.is_main:
        print(*values, flush=True)
