"""Group-wise INT-b fake quantisation as in the reference (docs/algorithms.md#c2 weights, #c3 activations).

Computed in the input dtype, as the reference did, so that bfloat16 results follow its arithmetic too (up to
an ulp on activations tied with the top-k threshold, see outliers.py).
"""

import torch
from torch import Tensor

from quantization.config import QuantConfig
from quantization.groups import flat_groups
from quantization.outliers import quantize_keeping_outliers
from quantization.rounding import round_to_integer_

MIN_RANGE = 1e-5  # asymmetric: floor on max - min (a constant group dequantises to this value)
MIN_ABSMAX = 1e-6  # symmetric: floor on the abs-max scale (an all-zero group stays zero)


def fake_quant_int(x: Tensor, config: QuantConfig, generator: torch.Generator | None = None) -> Tensor:
    groups = flat_groups(x, config.group_size)
    if config.symmetric:
        out = _symmetric(groups, config, generator)
    else:
        out = _asymmetric(groups, config.bits, config.stochastic, generator)
    return out.view(x.shape)


def _asymmetric(groups: Tensor, bits: int, stochastic: bool, generator: torch.Generator | None) -> Tensor:
    """Min-max codes 0..2^b-1 with a zero point clamped to the code range.

    The clamp is the reference's quirk: a group that does not straddle 0 cannot shift its range, so an
    all-positive group saturates into [0, max - min] (values in [1, 2) all become max - min).
    """
    max_code = 2**bits - 1
    low = groups.amin(-1, keepdim=True)
    high = groups.amax(-1, keepdim=True)
    scale = (high - low).clamp_min(MIN_RANGE) / max_code
    zero = torch.round(low / scale).neg_().clamp_(0, max_code)
    # clamp(round(x/S) + Z, 0, 2^b-1) - Z, folded into one clamp (exact: every term is an integer)
    codes = round_to_integer_(groups / scale, stochastic, generator)
    return codes.clamp_(-zero, max_code - zero).mul_(scale)


def _symmetric(groups: Tensor, config: QuantConfig, generator: torch.Generator | None) -> Tensor:
    """Abs-max codes -2^(b-1)..2^(b-1)-1 over the group without its top-k outliers (kept exact).

    Round-to-nearest never reaches -2^(b-1) (|y| <= 2^(b-1)-1); stochastic rounding can.
    """
    max_code = 2 ** (config.bits - 1) - 1

    def quantize_rest(values: Tensor, rest_absmax: Tensor) -> Tensor:
        scale = rest_absmax.clamp_min(MIN_ABSMAX)
        codes = round_to_integer_(values * (max_code / scale), config.stochastic, generator)
        return codes.clamp_(-max_code - 1, max_code).mul_(scale).div_(max_code)

    return quantize_keeping_outliers(groups, config.topk, quantize_rest)
