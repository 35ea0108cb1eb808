"""Per-tensor statistics over sharded (DTensor) parameters, as if every tensor were whole.

Under FSDP2 each rank holds one shard of every parameter, gradient and optimizer moment. Entry-wise math
runs on the local shards as it is; statistics of a whole tensor (max |g|, ||g||) are combined from the
shards' partial values. All tensors' partials travel in one collective per statistic and step (a stacked
vector), never one per tensor, so the cost does not grow with the number of tensors.

Plain tensors take none of these paths: `shard_group` is None for them and optimizers keep their unsharded
code. Only torch is imported, like the rest of `galore_torch`.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

Tensors = list[torch.Tensor]


def shard_group(tensor: torch.Tensor) -> dist.ProcessGroup | None:
    """The process group over which `tensor` is split into shards; None for a plain or replicated tensor.

    Supports one sharded mesh dimension (FSDP2's 1-D mesh, or the shard dimension of HSDP's 2-D mesh); a
    tensor sharded over several mesh dimensions (FSDP x tensor parallel) raises ValueError.
    """
    if not isinstance(tensor, DTensor):
        return None
    sharded_dims = [dim for dim, placement in enumerate(tensor.placements) if isinstance(placement, Shard)]
    if not sharded_dims:
        return None
    if len(sharded_dims) > 1:
        raise ValueError(f"a parameter is sharded over {len(sharded_dims)} mesh dimensions "
                         f"({tensor.placements}); StableSPAM/SPAM support one (FSDP2 or HSDP), not tensor parallel")
    return tensor.device_mesh.get_group(sharded_dims[0])


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an alias: in-place updates reach the DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole-shape tensor cut to `param`'s sharding (a DTensor holding this rank's slice), without
    communication: every rank must hold the same `full` (e.g. a mask drawn from identically seeded RNGs, or a
    gathered checkpoint). Returned unchanged when `param` is not a DTensor, `full` is already one, or `full`
    is a 0-dim per-tensor statistic (whole on every rank)."""
    if not isinstance(param, DTensor) or isinstance(full, DTensor) or full.dim() == 0:
        return full
    if full.shape != param.shape:
        raise ValueError(f"optimizer state of shape {tuple(full.shape)} does not fit a parameter of shape "
                         f"{tuple(param.shape)}; load a checkpoint of the same model")
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def all_reduce_stacked(values: Tensors, op: dist.ReduceOp, group: dist.ProcessGroup) -> Tensors:
    """Reduce many 0-dim tensors across `group` in one collective; returns them in their own dtypes.

    Stacked in the widest dtype among them, so float32 values travel exactly (float32 -> float64 is exact).
    Under `torch.compile` dynamo turns the in-place all_reduce into a traceable functional collective.
    """
    if not values:
        return []
    wide = values[0].dtype
    for value in values[1:]:
        wide = torch.promote_types(wide, value.dtype)
    stacked = torch.stack([value.to(wide) for value in values])
    dist.all_reduce(stacked, op=op, group=group)
    return [reduced.to(value.dtype) for reduced, value in zip(stacked.unbind(0), values)]
