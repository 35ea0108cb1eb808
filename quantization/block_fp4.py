"""E2M1 (FP4) block formats: plain E2M1 with an fp32 scale, OCP MXFP4 and NVIDIA NVFP4.

Blocks run along the last (reduction) dimension; the math is float32 whatever the input dtype, and the
result is cast back.

A block holding a NaN or an infinity comes out all NaN, as an MX block whose shared scale is NaN does; no
other block changes (NVFP4's per-tensor scale is taken over the finite values only).
"""

import torch
from torch import Tensor

from quantization.config import QuantConfig
from quantization.groups import last_dim_blocks, merge_blocks
from quantization.rounding import E2M1_MAX, floor_log2, round_to_e2m1_

E2M1_EMAX = 2  # exponent of the largest E2M1 power of two (4 = 2^2), OCP's emax_elem
E8M0_EXPONENT_RANGE = (-127, 127)  # MX shared scale 2^e (0xFF is NaN)
E4M3_MAX = 448.0  # float8_e4m3fn


def fake_quant_e2m1(x: Tensor, config: QuantConfig, generator: torch.Generator | None = None) -> Tensor:
    """E2M1 elements with an exact abs-max scale amax/6 per block of `group_size`."""
    blocks = last_dim_blocks(x, config.group_size)
    amax = _block_absmax(blocks)
    scale = _nan_unless_finite(amax / E2M1_MAX, amax)
    return merge_blocks(_quantize_blocks(blocks, scale, config.stochastic, generator), x)


def fake_quant_mxfp4(x: Tensor, config: QuantConfig, generator: torch.Generator | None = None) -> Tensor:
    """OCP MX: scale 2^(floor(log2 amax) - 2) per block of 32 (E8M0); elements above 6 * scale saturate."""
    blocks = last_dim_blocks(x, config.group_size)
    amax = _block_absmax(blocks)
    # amax 0 gives -127 - 2, clamped to the smallest E8M0 scale 2^-127: the block stays 0
    exponent = (floor_log2(amax) - E2M1_EMAX).clamp_(*E8M0_EXPONENT_RANGE)
    scale = _nan_unless_finite(torch.exp2(exponent.float()), amax)
    return merge_blocks(_quantize_blocks(blocks, scale, config.stochastic, generator), x)


def fake_quant_nvfp4(x: Tensor, config: QuantConfig, generator: torch.Generator | None = None) -> Tensor:
    """NVFP4: an fp32 per-tensor scale amax/(6*448) and per block of 16 an E4M3 scale of amax_block/6.

    The per-tensor amax is over the finite values, so that a NaN or an infinity cannot rescale (or zero) the
    other blocks.
    """
    blocks = last_dim_blocks(x, config.group_size)
    block_amax = _block_absmax(blocks)
    finite = blocks.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    tensor_scale = torch.maximum(finite.amax(), finite.amin().neg()) / (E2M1_MAX * E4M3_MAX)
    del finite
    tensor_scale = torch.where(tensor_scale > 0, tensor_scale, 1.0)  # all-zero tensor
    block_scale = (block_amax / E2M1_MAX / tensor_scale).clamp_max_(E4M3_MAX).to(torch.float8_e4m3fn)
    scale = _nan_unless_finite(block_scale.float() * tensor_scale, block_amax)
    return merge_blocks(_quantize_blocks(blocks, scale, config.stochastic, generator), x)


def _quantize_blocks(
    blocks: Tensor, scale: Tensor, stochastic: bool, generator: torch.Generator | None
) -> Tensor:
    """blocks / scale onto E2M1, times scale. A zero scale (all-zero block, or an NVFP4 block scale that
    underflows E4M3) gives zeros."""
    safe_scale = torch.where(scale > 0, scale, 1.0)
    return round_to_e2m1_(blocks / safe_scale, stochastic, generator).mul_(scale)


def _nan_unless_finite(scale: Tensor, amax: Tensor) -> Tensor:
    """NaN as the scale of blocks whose abs-max is NaN or infinite: their output becomes all NaN, where a finite
    scale (MX clamps the exponent, NVFP4 saturates E4M3) would turn an infinity into a finite value."""
    return torch.where(torch.isfinite(amax), scale, torch.nan)


def _block_absmax(blocks: Tensor) -> Tensor:
    """max |x| over each block: two reductions, without materialising |x|."""
    return torch.maximum(blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True).neg_())

