"""Rounding to integers and onto the E2M1 grid: round-to-nearest-even, or unbiased stochastic rounding."""

import torch
from torch import Tensor

E2M1_MAX = 6.0  # largest E2M1 magnitude: the grid is +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}
_FLOAT32_BIAS = 127
_FLOAT32_MANTISSA_BITS = 23


def round_to_integer_(y: Tensor, stochastic: bool, generator: torch.Generator | None = None) -> Tensor:
    """Round y in place: nearest integer (ties to even, like torch.round), or floor(y + U[0, 1)).

    The stochastic form is unbiased (E[result] = y), always lands on floor(y) or ceil(y), and leaves integers
    unchanged. It is the reference's `round(y + U[-0.5, 0.5))` without that form's ties, which can move an
    exact integer down by one. The sum is formed in float32 so that bfloat16 inputs are not biased by a
    rounding of `y + U`.
    """
    if not stochastic:
        return y.round_()
    noise = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    return y.copy_(noise.add_(y).floor_())


def round_to_e2m1_(y: Tensor, stochastic: bool, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 y in place onto the E2M1 values (ties to the even code); magnitudes above 6 saturate.

    E2M1 has spacing 0.5 below 2, 1 in [2, 4) and 2 in [4, 6], i.e. 2^(e-1) with e = floor(log2|y|)
    clamped to [0, 2]. Rounding y / spacing to an integer and scaling back rounds onto the grid (an even
    integer there is an even code). e is read from the float32 exponent bits: exact, and cheap in eager
    mode, where `torch.where` with scalar operands is slow on CPU.
    """
    y = y.clamp_(-E2M1_MAX, E2M1_MAX)
    spacing_exponent = floor_log2(y).clamp_(0, 2).sub_(1)
    # 2^e as float32 bits: biased exponent in the exponent field, zero mantissa
    spacing_bits = spacing_exponent.add_(_FLOAT32_BIAS).bitwise_left_shift_(_FLOAT32_MANTISSA_BITS)
    spacing = spacing_bits.view(torch.float32)
    return round_to_integer_(y.div_(spacing), stochastic, generator).mul_(spacing)


def floor_log2(x: Tensor) -> Tensor:
    """floor(log2 |x|) of float32 values as int32, exactly, read from the exponent bits (0 and subnormals give
    -127); torch.log2 can round up to the next integer just below a power of two."""
    biased = (x.view(torch.int32) >> _FLOAT32_MANTISSA_BITS).bitwise_and_(0xFF)
    return biased.sub_(_FLOAT32_BIAS)
