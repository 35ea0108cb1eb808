"""FSDP2 for models that do not fit one GPU: each decoder layer, then the root, sharded over all ranks.

`fully_shard` turns the parameters into DTensors sharded on dim 0 over a 1-D device mesh of the whole world
(cuda/nccl or cpu/gloo), in place: build the optimizer after `shard_model`, so it holds the sharded
parameters. StableSPAM and SPAM then compute their per-tensor statistics over whole tensors (see
`galore_torch.sharded`). Gathered full state dicts (`torch.distributed.checkpoint.state_dict`) are the
checkpoint format, so weights and optimizer state are stored unsharded (resuming exactly still needs the same
world size: the data position and RNG states are per rank).
"""

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from peft_pretraining.distributed import DistributedContext

# --fsdp_param_dtype: the dtype layers compute in (weights all-gathered in it); gradients are reduced in fp32.
FSDP_PARAM_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def shard_model(model: nn.Module, ctx: DistributedContext, param_dtype: str = "float32") -> FSDPModule:
    """Shard `model` (a LlamaForCausalLM, or anything with `model.layers`) in place and return it.

    The sharded master weights keep the model's dtype; with `param_dtype="bfloat16"` each layer is gathered
    and computed in bf16 and its gradients reduce-scattered in fp32 (MixedPrecisionPolicy).
    """
    if not ctx.is_distributed:
        raise ValueError("--fsdp needs 2 or more processes: launch with torchrun --nproc_per_node N (N >= 2), "
                         "or drop --fsdp")
    if param_dtype not in FSDP_PARAM_DTYPES:
        raise ValueError(f"--fsdp_param_dtype {param_dtype}: choose one of {', '.join(FSDP_PARAM_DTYPES)}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"--fsdp: {type(model).__name__} has no model.layers to shard one by one")
    compute_dtype = FSDP_PARAM_DTYPES[param_dtype]
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                  reduce_dtype=torch.float32 if compute_dtype is not None else None)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
