"""Compiled optimizer cores that cost the same to compile whatever the model's depth.

A compiled multi-tensor core traces every tensor of its input, so its cold compile grows with the number of
parameters (about 0.75 s per tensor on a 2-core CPU: minutes for a 24-layer model). But a transformer's
parameters repeat layer after layer. Cut a bucket into the repeating runs (one chunk per layer) plus one chunk
of everything else, and call the compiled core once per chunk: every layer chunk has the same shapes, so it
reuses one graph, and the compile cost no longer depends on the depth.

Only for updates that treat each tensor on its own (no statistic spans tensors), so that cutting a bucket
changes the grouping of the work, not its numbers.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch

BucketT = TypeVar("BucketT", bound=NamedTuple)
# Periods longer than this are not searched: a LLaMA layer has 9 tensors, most transformers fewer than 20.
MAX_PERIOD = 32
# Shorter periods are taken several at a time, so that a chunk is not a tensor or two (a call each).
MIN_CHUNK = 8
# Graphs dynamo may keep for one compiled function before it silently falls back to eager (its default is
# 8). Every optimizer instance in a process shares its core's code, hence that budget: chunk shapes, reset
# steps and other models in the same process (tests, sweeps, notebooks) each take a graph.
CORE_RECOMPILE_LIMIT = 64


def compile_core(core: Callable[..., Any]) -> Callable[..., Any]:
    """`core` compiled whole (fullgraph), keeping eager's explicit low-precision roundings (so bf16 moving
    averages stall where eager's do), with room for the graphs of many chunks and instances."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, CORE_RECOMPILE_LIMIT)
    return torch.compile(core, fullgraph=True, options={"emulate_precision_casts": True})


def periodic_chunks(signatures: Sequence[Hashable], max_period: int = MAX_PERIOD) -> list[list[int]]:
    """Positions 0..n-1 cut into one chunk per period of the longest periodic run of `signatures` (periods
    shorter than MIN_CHUNK several to a chunk), and one chunk of the positions outside those chunks (first,
    if any). Without two such chunks: one chunk of everything.

    A LLaMA's parameter shapes [embed, (q, k, v, o, gate, up, down, norm, norm) x L, norm, lm_head] give
    [[embed, norm, lm_head], layer 0, ..., layer L-1].
    """
    count = len(signatures)
    best_start, best_period, best_periods = 0, 0, 0
    for period in range(1, min(max_period, count // 2) + 1):
        start, periods = _longest_run(signatures, period)
        if periods >= 2 and periods * period > best_periods * best_period:
            best_start, best_period, best_periods = start, period, periods
    if best_period == 0 or best_periods // -(-MIN_CHUNK // best_period) < 2:
        return [list(range(count))]
    per_chunk = -(-MIN_CHUNK // best_period)  # periods per chunk
    length = per_chunk * best_period
    covered = range(best_start, best_start + best_periods // per_chunk * length)
    chunks = [list(range(start, start + length)) for start in covered[::length]]
    outside = [index for index in range(count) if index not in covered]
    return [outside, *chunks] if outside else chunks


def _longest_run(signatures: Sequence[Hashable], period: int) -> tuple[int, int]:
    """(start, number of whole periods) of the longest stretch where signature[i] == signature[i + period]."""
    best_start, best_length, start = 0, 0, 0
    for index in range(len(signatures) - period + 1):
        repeats = index < len(signatures) - period and signatures[index] == signatures[index + period]
        if not repeats:
            if index - start > best_length:
                best_start, best_length = start, index - start
            start = index + 1
    return best_start, (best_length + period) // period


def take(bucket: BucketT, indices: list[int], size: int) -> BucketT:
    """The bucket restricted to the tensors at `indices` (of `size`): per-tensor lists are picked from,
    per-tensor columns ([fields, size] tensors) selected; bucket-wide values and empty lists are shared."""
    fields = {}
    for name, value in bucket._asdict().items():
        if isinstance(value, list) and len(value) == size:
            value = [value[index] for index in indices]
        elif isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == size:
            value = value[:, indices]
        fields[name] = value
    return type(bucket)(**fields)


def run_in_chunks(core: Callable[..., list[Any]], buckets: list[BucketT], rules: list[Any],
                  merge: Callable[[list[tuple[list[int], Any]]], Any]) -> list[Any]:
    """`core(buckets, rules)`, with every bucket that has periodic chunks (see `periodic_chunks`) computed one
    chunk at a time; the other buckets go through one call together, as without chunking. `merge` turns the
    (indices, result) of a bucket's chunks into that bucket's result."""
    chunked = {}
    for index, bucket in enumerate(buckets):
        params = bucket._asdict()["params"]
        chunks = periodic_chunks([(tuple(p.shape), p.dtype, p.device) for p in params])
        if len(chunks) > 1:
            chunked[index] = chunks
    whole = [index for index in range(len(buckets)) if index not in chunked]
    results: list[Any] = [None] * len(buckets)
    if whole:
        for index, result in zip(whole, core([buckets[i] for i in whole], [rules[i] for i in whole])):
            results[index] = result
    for index, chunks in chunked.items():
        size = len(buckets[index]._asdict()["params"])
        results[index] = merge([(indices, core([take(buckets[index], indices, size)], [rules[index]])[0])
                                for indices in chunks])
    return results


def merge_per_tensor(results: list[tuple[list[int], tuple[list, ...]]]) -> tuple[list, ...]:
    """Merge chunk results that are tuples of per-tensor lists back into the bucket's tensor order."""
    size = sum(len(indices) for indices, _ in results)
    merged = tuple([None] * size for _ in results[0][1])
    for indices, fields in results:
        for target, values in zip(merged, fields):
            for index, value in zip(indices, values):
                target[index] = value
    return merged


def merge_sum(results: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Merge chunk results that are sums over the bucket (e.g. a squared norm)."""
    return torch.stack([value for _, value in results]).sum()
