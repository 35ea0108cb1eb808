"""8-bit optimizer states: blockwise dynamic quantization (as bitsandbytes stores Adam's moments) and AdamW8bit.

A tensor is cut into blocks of `block_size` consecutive entries (the last one may be short). Each block is
divided by its largest |x| (its absmax, kept in float32) and every entry of the result, in [-1, 1], is stored
as the index (uint8) of the nearest of 256 values, the "dynamic" code table. The table spends its codes
unevenly: it covers seven decades, [0.1, 1] * 10^-d for d = 6 ... 0, and splits the decade d into 2^(6 - d)
equal bins when signed (mirrored for negatives), twice as many when unsigned (no sign to store); a code is the
midpoint of its bin. 0 and +1 complete the 256 (signed: 2 * 127 + 2, unsigned: 254 + 2; the signed table has
no -1, so a block's most negative entry is stored 0.7% short when it is the absmax, as in bitsandbytes). Small
entries keep a few significant bits whatever their magnitude, large ones get the finest steps: the error is at
most 0.9 / 128 (signed) or 0.9 / 256 (unsigned) of the block's absmax.

Pure torch on any device; no host syncs; `torch.compile` traces it. Bytes per entry: 1 + 4 / block_size.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from galore_torch.base import (
    evaluate_closure,
    reject_complex_param,
    reject_sparse_grad,
    validate_betas,
    validate_non_negative,
    validate_positive_int,
)

DEFAULT_BLOCK_SIZE = 2048
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 256, 2048
DECADES = 7


def dynamic_code_table(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values a code stands for (see the module docstring), built in float64."""
    values = [0.0, 1.0]
    for decade in range(DECADES):
        bins = 2 ** decade if signed else 2 ** (decade + 1)
        scale = 10.0 ** (decade - (DECADES - 1))
        edges = [0.1 + 0.9 * i / bins for i in range(bins + 1)]
        midpoints = [scale * (low + high) / 2 for low, high in zip(edges, edges[1:])]
        values += midpoints + ([-m for m in midpoints] if signed else [])
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float64).float()


_TABLES = {signed: dynamic_code_table(signed) for signed in (True, False)}
# Round to nearest without a search: |y| in [2^-FLOOR_EXPONENT, 1] is cut into intervals by its float32 exponent
# and the top MANTISSA_BITS bits of its mantissa (the bits of y, shifted: one integer op); no interval holds more
# than one decision boundary (midpoint between neighbouring codes), so the code is the interval's first code plus
# one if y lies above that boundary. Smaller |y| (all below the first boundary) share interval 0.
MANTISSA_BITS, FLOOR_EXPONENT = 8, 24
_SHIFT, _FIRST = 23 - MANTISSA_BITS, (127 - FLOOR_EXPONENT) << MANTISSA_BITS
_INTERVALS = (FLOOR_EXPONENT + 1) << MANTISSA_BITS


def _interval_lookup(codes: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(first code, boundary inside or inf) per interval, for the sorted nonnegative `codes` (0 first, 1 last)."""
    boundaries = ((torch.tensor(codes[1:], dtype=torch.float64) + torch.tensor(codes[:-1], dtype=torch.float64))
                  / 2).float()
    starts = (torch.arange(_INTERVALS, dtype=torch.int32) + _FIRST).bitwise_left_shift(_SHIFT).view(torch.float32)
    starts[0] = 0.0
    ends = torch.cat([starts[1:], torch.tensor([math.inf])])
    first = torch.searchsorted(boundaries, starts, side="left")  # boundaries below the interval's start
    inside = torch.searchsorted(boundaries, ends, side="left") - first
    assert int(inside.max()) <= 1, "an interval holds two boundaries: raise MANTISSA_BITS"
    split = torch.where(inside == 1, boundaries[first.clamp(max=len(boundaries) - 1)], math.inf)
    return first.int(), split


# signed: the nonnegative half (codes 127..255); a negative value takes the mirror of its magnitude's code
_SIGNED_ZERO = 127
_LOOKUPS = {signed: _interval_lookup(table[_SIGNED_ZERO if signed else 0:].tolist())
            for signed, table in _TABLES.items()}
_ON_DEVICE: dict[tuple[str, bool, torch.device], torch.Tensor] = {}


def _on(kind: str, signed: bool, device: torch.device) -> torch.Tensor:
    """The code table ("table") or an interval lookup ("first", "split") on `device`, copied there once."""
    key = (kind, signed, device)
    if key not in _ON_DEVICE:
        source = {"table": _TABLES[signed], "first": _LOOKUPS[signed][0], "split": _LOOKUPS[signed][1]}[kind]
        _ON_DEVICE[key] = source.to(device)
    return _ON_DEVICE[key]


def _nearest_codes(y: torch.Tensor, signed: bool) -> torch.Tensor:
    """The index of the code nearest to each entry of float32 `y` in [-1, 1] (int32); ties go to the smaller
    magnitude. Unsigned: negatives count as 0."""
    magnitude = y.abs() if signed else y.clamp(min=0)
    interval = (magnitude.view(torch.int32).bitwise_right_shift(_SHIFT) - _FIRST).clamp_(0, _INTERVALS - 1)
    interval = interval.reshape(-1)
    codes = (_on("first", signed, y.device).index_select(0, interval)
             + (magnitude.reshape(-1) > _on("split", signed, y.device).index_select(0, interval))).view(y.shape)
    if not signed:
        return codes
    # -1 is not a code: a magnitude nearest to +1 takes the most negative code, 0
    return torch.where(y < 0, (_SIGNED_ZERO - codes).clamp(min=0), codes + _SIGNED_ZERO)


def validate_block_size(block_size: int) -> None:
    if not (isinstance(block_size, int) and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            and block_size & (block_size - 1) == 0):
        raise ValueError(f"invalid block_size: {block_size!r} (a power of two from {MIN_BLOCK_SIZE} to "
                         f"{MAX_BLOCK_SIZE})")


def num_blocks(numel: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    return (numel + block_size - 1) // block_size  # integer ops: traced symbolically under dynamic shapes


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x flattened, zero-padded to whole blocks, one block a row."""
    flat = x.reshape(-1)
    return F.pad(flat, (0, num_blocks(flat.numel(), block_size) * block_size - flat.numel())).view(-1, block_size)


def quantize_blockwise(x: torch.Tensor, *, signed: bool,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like x, float32 absmax per block). Unsigned tables need x >= 0 (negatives round to
    0). An all-zero block has absmax 0 and decodes to zeros; NaN in a block makes the whole block NaN."""
    blocks = _blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = _nearest_codes(normalized, signed).to(torch.uint8)
    return codes.view(-1)[:x.numel()].view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool,
                         block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values `quantize_blockwise` stored: table[code] * absmax of the code's block, in `dtype`."""
    values = _on("table", signed, codes.device).index_select(0, codes.reshape(-1).int())
    blocks = _blocks(values, block_size) * absmax.unsqueeze(1)
    return blocks.view(-1)[:codes.numel()].view(codes.shape).to(dtype)


def _quantize_signed(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_blockwise(flat, signed=True, block_size=block_size)


def _quantize_unsigned(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_blockwise(flat, signed=False, block_size=block_size)


def _dequantize_signed(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_blockwise(codes, absmax, signed=True, block_size=block_size, dtype=dtype)


def _dequantize_unsigned(codes: torch.Tensor, absmax: torch.Tensor, block_size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    return dequantize_blockwise(codes, absmax, signed=False, block_size=block_size, dtype=dtype)


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile for flat tensors of static sizes: a graph per distinct numel (a handful in a
    transformer); each of the four functions is its own code object, so their graphs count against separate
    recompile limits. ~10x faster than eager on a CPU (dynamic shapes were barely faster than eager). Wrapped on
    first use: importing torch's compiler costs seconds."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]

# Adam's moments: the first signed, the second (>= 0) unsigned, as bitsandbytes.
MOMENT_SIGNED = {"exp_avg": True, "exp_avg_sq": False}
# Tensors with fewer entries keep full-precision moments, as in bitsandbytes: a negligible share of the memory.
MIN_8BIT_SIZE = 4096


def init_moments_8bit(state: dict[str, Any], p: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Zero 8-bit moments of `p`: codes 0 with absmax 0 decode to 0 in either table."""
    for key in MOMENT_SIGNED:
        state[key] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
        state[f"{key}_absmax"] = torch.zeros(num_blocks(p.numel(), block_size), dtype=torch.float32,
                                             device=p.device)


def load_moment(state: dict[str, Any], key: str, block_size: int = DEFAULT_BLOCK_SIZE,
                dtype: torch.dtype = torch.float32, compile: bool = False) -> torch.Tensor:
    """The moment `key`: dequantized to `dtype` (by the compiled function with `compile`) when stored 8-bit,
    else the stored tensor itself."""
    codes, absmax, signed = state[key], state.get(f"{key}_absmax"), MOMENT_SIGNED[key]
    if codes.dtype != torch.uint8:
        return codes
    if compile:
        dequantize = _compiled(_dequantize_signed if signed else _dequantize_unsigned)
        return dequantize(codes.reshape(-1), absmax, block_size, dtype).view(codes.shape)
    return dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size, dtype=dtype)


def first_moment_bound(beta1: float, beta2: float) -> float:
    """The largest |m| / sqrt(v) exact Adam can reach with decay rates beta1 <= `beta1` (inf if beta1^2 >= beta2).

    m_t^2 <= v_t (1 - b1)^2 / ((1 - b2)(1 - b1^2 / b2)) by Cauchy-Schwarz over the two EMAs' weights, and the
    bound carries from step to step. Its maximum over b1 in [0, beta1] sits at an end of that interval.
    """
    if beta1**2 >= beta2:
        return math.inf
    return max((1 - b1) / math.sqrt((1 - beta2) * (1 - b1**2 / beta2)) for b1 in (0.0, beta1))


def load_moments(state: dict[str, Any], dtype: torch.dtype = torch.float32, bound: float = math.inf,
                 block_size: int = DEFAULT_BLOCK_SIZE, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) for an update, 8-bit ones dequantized to `dtype` with |m| clamped to
    bound * sqrt(v) (`first_moment_bound`).

    Why: v spans the square of m's range, so within a block a small v underflows to code 0 while its m does
    not (a gradient under 4e-4 of the block's largest: the rare-token rows of an LM head); the update
    m / (sqrt(v) + eps) then explodes (a tiny LLaMA at lr 1e-2 diverged). Exact Adam never exceeds the bound,
    so the clamp only removes quantization artefacts; full-precision moments are returned untouched.
    """
    exp_avg = load_moment(state, "exp_avg", block_size, dtype, compile)
    exp_avg_sq = load_moment(state, "exp_avg_sq", block_size, dtype, compile)
    if state["exp_avg"].dtype == torch.uint8 and math.isfinite(bound):
        limit = exp_avg_sq.float().sqrt().mul_(bound).to(dtype)
        exp_avg.clamp_(min=-limit, max=limit)
    return exp_avg, exp_avg_sq


def store_moment(state: dict[str, Any], key: str, value: torch.Tensor,
                 block_size: int = DEFAULT_BLOCK_SIZE, compile: bool = False) -> None:
    """Requantize `value` into the 8-bit moment `key` in place (a no-op for a moment kept in full precision,
    which `value` then is)."""
    if state[key].dtype != torch.uint8:
        return
    if compile:
        quantize = _compiled(_quantize_signed if MOMENT_SIGNED[key] else _quantize_unsigned)
        codes, absmax = quantize(value.reshape(-1), block_size)
    else:
        codes, absmax = quantize_blockwise(value, signed=MOMENT_SIGNED[key], block_size=block_size)
    state[key].copy_(codes.view(state[key].shape))
    state[f"{key}_absmax"].copy_(absmax)


def store_moments(states: list[dict[str, Any]], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                  compile: bool = False) -> None:
    """`store_moment` of both moments of every state, after an update of the loaded (working) moments."""
    for state, exp_avg, exp_avg_sq in zip(states, exp_avgs, exp_avg_sqs):
        store_moment(state, "exp_avg", exp_avg, compile=compile)
        store_moment(state, "exp_avg_sq", exp_avg_sq, compile=compile)


def restore_8bit_state(state: dict[str, Any], saved: dict[str, Any], device: torch.device) -> None:
    """Undo torch.optim's cast of loaded state to the param dtype for 8-bit moments: uint8 codes and float32
    absmax, copied so the loaded dict is never aliased."""
    for key in MOMENT_SIGNED:
        if key in saved and saved[key].dtype == torch.uint8:
            state[key] = saved[key].to(device=device, copy=True)
            state[f"{key}_absmax"] = saved[f"{key}_absmax"].to(device=device, dtype=torch.float32, copy=True)


def validate_state_bits(state_bits: int, sharded: bool = False) -> None:
    """8 or 32; 8-bit blocks of FSDP2 shards would not survive a re-sharding checkpoint, so those are refused."""
    if state_bits not in (8, 32):
        raise ValueError(f"invalid state_bits: {state_bits!r} (8 or 32)")
    if state_bits == 8 and sharded:
        raise ValueError("state_bits=8 does not support sharded (FSDP2) params; use state_bits=32")


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW with its moments stored blockwise 8-bit (bitsandbytes' AdamW8bit, in plain torch).

    Each step dequantizes a param's moments to float32 (|m| clamped to what exact Adam allows given v, see
    `load_moments`), updates them and the param exactly as AdamW does (decoupled decay, bias-corrected step),
    then requantizes them: the update itself always uses the fresh float32 moments. Tensors with fewer than
    `min_8bit_size` entries (biases, norms) keep float32 moments, as bitsandbytes does: they are a negligible
    share of the memory. Params are updated one at a time, so the float32 working copies of one tensor exist at
    once. State per param: `step`
    (an int), `exp_avg`, `exp_avg_sq` (uint8 codes or float32) and `exp_avg_absmax`, `exp_avg_sq_absmax`
    (float32, one per block). No host syncs in `step()`. `compile=True` runs the (de)quantization through
    `torch.compile` (a graph per distinct tensor size; ~10x faster on a CPU); the arithmetic stays eager.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 min_8bit_size: int = MIN_8BIT_SIZE, compile: bool = False):
        validate_non_negative(lr, "lr")
        validate_betas(betas)
        validate_non_negative(eps, "eps")
        validate_non_negative(weight_decay, "weight_decay")
        if amsgrad:
            raise ValueError("AdamW8bit has no amsgrad (bitsandbytes' has none either); use torch.optim.AdamW")
        validate_block_size(block_size)
        validate_positive_int(min_8bit_size, "min_8bit_size")
        # block_size and min_8bit_size are group keys, so state_dict(), copies and pickles carry them
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "block_size": block_size, "min_8bit_size": min_8bit_size, "compile": compile})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of every param with a gradient; returns the closure's loss."""
        loss = evaluate_closure(closure)
        for group_index, group in enumerate(self.param_groups):
            lr, (beta1, beta2), eps, block_size = group["lr"], group["betas"], group["eps"], group["block_size"]
            for param_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                reject_complex_param("AdamW8bit", p, param_index, group_index)
                reject_sparse_grad("AdamW8bit", p.grad, param_index, group_index)
                state = self.state[p]
                if "step" not in state:
                    self._init_state(state, p, group)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = load_moments(state, bound=first_moment_bound(beta1, beta2),
                                                   block_size=block_size, compile=group["compile"])
                grad = p.grad.float()
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                working = p.float()
                working.mul_(1 - lr * group["weight_decay"])
                working.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
                if working is not p:
                    p.copy_(working)
                store_moment(state, "exp_avg", exp_avg, block_size, group["compile"])
                store_moment(state, "exp_avg_sq", exp_avg_sq, block_size, group["compile"])
        return loss

    def _init_state(self, state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        state["step"] = 0
        if p.numel() >= group["min_8bit_size"]:
            init_moments_8bit(state, p, group["block_size"])
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping codes uint8 and absmax and float32 moments float32 whatever the param dtype."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in MOMENT_SIGNED:
                if saved[key].dtype != torch.uint8:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)
            restore_8bit_state(state, saved, p.device)
