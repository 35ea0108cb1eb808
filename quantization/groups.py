"""How a tensor is cut into scale groups: runs of the flattened tensor, or blocks along the last dimension."""

import torch
import torch.nn.functional as F
from torch import Tensor


def flat_groups(x: Tensor, group_size: int) -> Tensor:
    """Rows of `group_size` consecutive elements of the flattened tensor (the reference's `view(-1, g)`).

    Groups straddle rows when the last dimension is not a multiple of the group size (LLaMA-350M's down_proj
    has 2736 inputs), exactly as in the reference.
    """
    if x.numel() % group_size:
        raise ValueError(
            f"invalid group_size: {group_size} does not divide the {x.numel()} elements of a tensor of shape "
            f"{tuple(x.shape)} (groups run over the flattened tensor; pick a divisor)"
        )
    return x.reshape(-1, group_size)


def last_dim_blocks(x: Tensor, block_size: int) -> Tensor:
    """float32 blocks of shape (..., n_blocks, block_size) along the last (reduction) dimension.

    A last dimension that is not a multiple of the block is zero-padded, which makes the final block a short
    one (zeros change no abs-max): block formats pad K the same way on hardware, and LLaMA-350M's 2736 and
    LLaMA-1B's 5461 are not multiples of 32.
    """
    x = x.float()
    padding = -x.shape[-1] % block_size
    if padding:
        x = F.pad(x, (0, padding))
    return x.reshape(*x.shape[:-1], -1, block_size)


def merge_blocks(blocks: Tensor, like: Tensor) -> Tensor:
    """Inverse of `last_dim_blocks`: drop the padding; the result has the shape and dtype of `like`."""
    merged = blocks.flatten(-2)[..., : like.shape[-1]]
    return merged.to(like.dtype).contiguous()
