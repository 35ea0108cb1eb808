"""The reference's "FP4" (docs/algorithms.md#c4): a uniform 9-level grid {-4..4} * alpha/4, not E2M1.

The reference evaluates the LLM-FP4 formula (e=1, m=2, b=1, per-group max alpha after removing the top-k),
but with those constants its exponent is always clamped to the same value, leaving a round-half-even of
x / (alpha/4). Computed that way in the input dtype, this matches the reference bit for bit in float32 and
bfloat16 (in bfloat16 the quotient is rounded before `round`, as in the reference), except where top-k ties
meet the alpha floor (see outliers.py).

alpha: the reference floors it at 1e-6, so a group whose non-outlier entries are all zero (alpha == 0)
quantises them to 0 without dividing by zero; we keep that floor. With topk=0 the reference returns its
input unquantised (it only quantises inside its top-k branch); here topk=0 quantises with alpha = max|x|.
"""

import torch
from torch import Tensor

from quantization.config import QuantConfig
from quantization.groups import flat_groups
from quantization.outliers import quantize_keeping_outliers
from quantization.rounding import round_to_integer_

LEVELS = 4  # codes -4..4
MIN_ALPHA = 1e-6


def fake_quant_fp4_ref(x: Tensor, config: QuantConfig, generator: torch.Generator | None = None) -> Tensor:
    def quantize_rest(values: Tensor, alpha: Tensor) -> Tensor:
        # Every non-outlier |x| is <= alpha, so the codes already lie in -4..4: no clamp needed.
        spacing = alpha.clamp_min(MIN_ALPHA) / LEVELS
        return round_to_integer_(values / spacing, config.stochastic, generator).mul_(spacing)

    groups = flat_groups(x, config.group_size)
    return quantize_keeping_outliers(groups, config.topk, quantize_rest).view(x.shape)
