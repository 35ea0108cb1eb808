"""`fake_quantize`: quantise and dequantise a tensor in one of the formats of `QuantConfig`."""

from collections.abc import Callable

import torch
from torch import Tensor

from quantization.block_fp4 import fake_quant_e2m1, fake_quant_mxfp4, fake_quant_nvfp4
from quantization.config import QuantConfig
from quantization.fp4_ref import fake_quant_fp4_ref
from quantization.int_quant import fake_quant_int

_QUANTIZERS: dict[str, Callable[[Tensor, QuantConfig, torch.Generator | None], Tensor]] = {
    "int": fake_quant_int,
    "fp4_ref": fake_quant_fp4_ref,
    "e2m1": fake_quant_e2m1,
    "mxfp4": fake_quant_mxfp4,
    "nvfp4": fake_quant_nvfp4,
}


@torch.no_grad()
def fake_quantize(x: Tensor, config: QuantConfig, generator: torch.Generator | None = None) -> Tensor:
    """The values `x` takes after a round trip through `config`'s format: same shape and dtype, new tensor.

    Not differentiable (the result is detached); `QuantLinear` provides the straight-through backward.
    A NaN or infinity never reaches another scale group or block: the block formats' block holding one comes
    out all NaN; an int/fp4_ref group holding one comes out NaN, unless it is one of the group's top-k outliers,
    which are kept as they are.

    Args:
        x: floating-point tensor; "int"/"fp4_ref" need numel divisible by group_size.
        config: the format.
        generator: random source for stochastic rounding (on x's device); None uses the global RNG.
    """
    if not x.is_floating_point():
        raise ValueError(f"invalid x: dtype {x.dtype} (fake_quantize needs a floating-point tensor)")
    if x.dim() == 0:
        raise ValueError("invalid x: a 0-dim tensor (fake_quantize needs at least one dimension)")
    return _QUANTIZERS[config.format](x, config, generator)
