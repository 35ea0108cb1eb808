"""Top-k outliers: a group's k largest magnitudes skip the quantiser and stay exact, as in the reference."""

from collections.abc import Callable

import torch
from torch import Tensor

# A sentinel below every magnitude: marks entries already taken as outliers.
_REMOVED = -1.0


def quantize_keeping_outliers(
    groups: Tensor, topk: int, quantize_rest: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """`quantize_rest(groups, threshold)` with the entries above the threshold written back unchanged.

    `threshold` (shape (rows, 1)) is the (topk+1)-th largest |x| of each row, i.e. the largest magnitude
    once the outliers are removed; `quantize_rest` must return a new tensor. The outliers are the entries
    strictly above it: the reference's top-k, except that entries tied with the threshold are quantised
    rather than some of them kept by `topk`'s order (such an entry quantises to itself, or within an ulp
    of itself, on the reference's grids, unless fp4_ref's alpha floor of 1e-6 applies).

    Eager mode finds the threshold by removing the maxima one at a time (`max` + `scatter`: cheaper than
    `topk` on CPU) and scatters the kept values back; under torch.compile it walks down with abs-max
    reductions and a mask keeps the same entries, which fuses.
    """
    magnitude = groups.abs()
    if topk == 0:
        return quantize_rest(groups, magnitude.amax(-1, keepdim=True))
    if torch.compiler.is_compiling():
        threshold = kth_largest(magnitude, topk)
        return torch.where(magnitude > threshold, groups, quantize_rest(groups, threshold))
    indices = []
    for _ in range(topk):
        index = magnitude.max(-1, keepdim=True).indices
        magnitude.scatter_(-1, index, _REMOVED)
        indices.append(index)
    outliers = torch.cat(indices, -1)
    threshold = magnitude.amax(-1, keepdim=True)
    quantized = quantize_rest(groups, threshold)
    values = groups.gather(-1, outliers)
    kept = torch.where(values.abs() > threshold, values, quantized.gather(-1, outliers))
    return quantized.scatter_(-1, outliers, kept)


def kth_largest(magnitude: Tensor, k: int) -> Tensor:
    """The (k+1)-th largest entry of each row of a non-negative tensor, repeats counted, shape (rows, 1).

    Walks down the distinct values with abs-max passes and stops once more than k entries were seen:
    k+1 fusible reductions instead of a sort, for torch.compile.
    """
    level = magnitude.amax(-1, keepdim=True)
    seen = (magnitude == level).sum(-1, keepdim=True)
    result = level
    remaining = magnitude
    for _ in range(k):
        remaining = torch.where(remaining >= level, _REMOVED, remaining)
        level = remaining.amax(-1, keepdim=True)
        result = torch.where(seen > k, result, level)
        seen = seen + (remaining == level).sum(-1, keepdim=True)
    return result
