"""StableSPAM: Adam behind adaptive spike clipping (AdaClip), gradient-norm normalisation (AdaGN) and a
periodic momentum reset.

The step is split in two: host-side bookkeeping on Python numbers (step counters, the cosine scale, bias
corrections, the reset gate) and a functional core over lists of tensors (`update_buckets`) that never
syncs with the device and that `torch.compile(fullgraph=True)` compiles whole. Reference behaviour:
docs/algorithms.md#a.
"""

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from galore_torch.base import (
    ConfiguredOptimizer,
    check_variants_match,
    evaluate_closure,
    reject_complex_param,
    reject_sparse_grad,
    validate_betas,
    validate_closed_unit_interval,
    validate_non_negative,
    validate_non_negative_int,
    validate_positive_int,
    validate_unit_interval,
    validate_variant,
)
from galore_torch.blockwise8bit import (
    MIN_8BIT_SIZE,
    first_moment_bound,
    init_moments_8bit,
    load_moments,
    restore_8bit_state,
    store_moments,
    validate_state_bits,
)
from galore_torch.chunking import compile_core, merge_per_tensor, run_in_chunks
from galore_torch.sharded import all_reduce_stacked, local, shard_group, shard_like

Tensors = list[torch.Tensor]
# (param, its state, the AdaClip/AdaGN step count of this step)
Member = tuple[torch.Tensor, dict[str, Any], int]


def cosine_scale(step: int, total_T: int | None, eta_min: float, clamp: bool) -> float:
    """The factor s_t on beta1 and gamma1 at global step `step` (1-based): 1 without `total_T`.

    Written as torch's CosineAnnealingLR closed form (T_max = total_T + 1, base value 1) evaluates it, so the
    floats match the original bit for bit. That form is periodic: eta_min at total_T + 1, back to 1 at
    2 (total_T + 1). With `clamp` it stays at eta_min after total_T + 1.
    """
    if total_T is None:
        return 1.0
    if clamp and step > total_T + 1:
        return eta_min
    return eta_min + (1.0 - eta_min) * (1 + math.cos(math.pi * step / (total_T + 1))) / 2


class Coefficients(NamedTuple):
    """The numbers of one step that change from step to step, one value per param of a bucket.

    Computed on the host in Python floats in the original's order (so they round once, to the compute dtype,
    as the original's scalars do) and handed to the core as one tensor, a row per field: a compiled core then
    sees new values, not new constants, and never recompiles for them.
    """

    decay: Any  # 1 - lr * weight_decay
    gamma1_scaled: Any  # gamma1 * s_t
    one_minus_gamma1_scaled: Any
    beta1_scaled: Any  # beta1 * s_t
    one_minus_beta1_scaled: Any
    clip_bias_correction: Any  # 1 - theta^k
    norm_bias_correction: Any  # 1 - (gamma1 * s_t)^k
    sq_norm_bias_correction: Any  # 1 - gamma2^k
    step_size: Any  # lr / (1 - (beta1 * s_t)^k_adam)
    inverse_bias_correction2_sqrt: Any  # 1 / sqrt(1 - beta2^k_adam)


class BucketRule(NamedTuple):
    """What the core does to one bucket; all fields are constants, so a compiled core guards on them cheaply."""

    theta: float
    gamma2: float
    beta2: float
    eps: float
    decay: bool  # weight decay on
    reset_before: bool  # zero all moments (amsgrad's maximum included) before they are used
    reset_after: bool  # zero the two Adam moments after the update (the original's delayed reset)
    maximize: bool  # step along +grad: the update of -grad
    sharded: bool  # the tensors are local shards (FSDP2): per-tensor statistics are reduced across ranks


class Bucket(NamedTuple):
    """Params updated together: same group, device and dtype. `max_exp_avg_sqs` is empty without amsgrad."""

    params: Tensors
    grads: Tensors
    exp_avgs: Tensors
    exp_avg_sqs: Tensors
    max_exp_avg_sqs: Tensors
    m_maxes: Tensors  # EMA of max |g|, 0-dim
    m_norms: Tensors  # EMA of the clipped gradient's norm, 0-dim
    v_norms: Tensors  # EMA of its square, 0-dim
    coefficients: torch.Tensor  # [len(Coefficients._fields), len(params)], in the compute dtype


def update_bucket(bucket: Bucket, rule: BucketRule) -> tuple[Tensors, Tensors]:
    """One StableSPAM update of a bucket in place; returns (clip thresholds, AdaGN scales), 0-dim tensors.

    Computes in the dtype of `bucket.coefficients` (float32, or float64 for float64 params) and stores into
    the params and state in their own dtype. Follows the original's arithmetic step by step, except that
    divisions by a per-tensor number are multiplications by its reciprocal (a rounding difference, and
    three divisions per entry fewer). With bf16/fp16 state it rounds to that dtype where the original's
    operations did, the products of every moving average included: that is what makes bf16 EMAs stall where
    the original's did (docs/algorithms.md#a5-9). Reads `grads` without writing them.
    """
    grads = _compute_dtype_grads(bucket, rule)
    clipped = _adaclip(bucket, rule, grads, [_abs_max(grad) for grad in grads])
    del grads
    return _adagn_and_adam(bucket, rule, clipped, [_norm(grad) for grad in clipped.gradients])


def update_buckets(buckets: list[Bucket], rules: list[BucketRule],
                   shard_group: dist.ProcessGroup | None = None) -> list[tuple[Tensors, Tensors]]:
    """The functional core of one step (the unit that gets compiled): `update_bucket` over every bucket.

    Buckets of shards (`rule.sharded`, FSDP2) need max |g| and the clipped norm of whole tensors: then all
    buckets go through the phases together, every shard's partial maximum reduced across `shard_group` in
    one all_reduce(MAX) and every partial squared norm in one all_reduce(SUM): two collectives per step,
    whatever the number of tensors.
    """
    if not any(rule.sharded for rule in rules):
        return [update_bucket(bucket, rule) for bucket, rule in zip(buckets, rules)]
    grads = [_compute_dtype_grads(bucket, rule) for bucket, rule in zip(buckets, rules)]
    maxima = [[_shard_abs_max(grad) if rule.sharded else _abs_max(grad) for grad in bucket_grads]
              for bucket_grads, rule in zip(grads, rules)]
    maxima = _reduce_sharded(maxima, rules, dist.ReduceOp.MAX, shard_group)
    clipped = [_adaclip(bucket, rule, bucket_grads, bucket_maxima)
               for bucket, rule, bucket_grads, bucket_maxima in zip(buckets, rules, grads, maxima)]
    del grads
    squares = [[_sum_of_squares(grad) if rule.sharded else _norm(grad) for grad in bucket_clipped.gradients]
               for bucket_clipped, rule in zip(clipped, rules)]
    squares = _reduce_sharded(squares, rules, dist.ReduceOp.SUM, shard_group)
    norms = [torch._foreach_sqrt(bucket_squares) if rule.sharded else bucket_squares
             for bucket_squares, rule in zip(squares, rules)]
    results = []
    for bucket, rule, bucket_norms in zip(buckets, rules, norms):
        # popped, so each bucket's clipped gradients are freed once its update is done
        results.append(_adagn_and_adam(bucket, rule, clipped.pop(0), bucket_norms))
    return results


class _Clipped(NamedTuple):
    """A bucket after AdaClip: the step's numbers, the updated max |g| EMAs, thresholds and clipped gradients."""

    coefficients: Coefficients
    m_maxes: Tensors
    thresholds: Tensors
    gradients: Tensors


def _compute_dtype_grads(bucket: Bucket, rule: BucketRule) -> Tensors:
    """The bucket's gradients in the compute dtype (the gradients themselves when they have it), negated to
    maximize: negation is exact, so the core then sees exactly what minimizing on -grad would."""
    grads = [grad.to(bucket.coefficients.dtype) for grad in bucket.grads]
    return torch._foreach_neg(grads) if rule.maximize else grads


def _adaclip(bucket: Bucket, rule: BucketRule, grads: Tensors, maxima: Tensors) -> _Clipped:
    """AdaClip: EMA of the unclipped max |g| (`maxima`, of whole tensors); entries above its bias-corrected
    value T are multiplied by T / max, so the largest lands on T and smaller spikes proportionally below."""
    dtype = bucket.coefficients.dtype
    rounded = _state_rounding(bucket.exp_avgs[0].dtype, dtype)
    k = Coefficients(*(list(row.unbind(0)) for row in bucket.coefficients))
    m_maxes = _moving_average(_working(bucket.m_maxes, dtype), maxima, rule.theta, 1.0 - rule.theta, rounded)
    thresholds = rounded(torch._foreach_div(m_maxes, k.clip_bias_correction))
    clip_factors = torch._foreach_div(thresholds, maxima)
    gradients = [torch.where(grad.abs() > threshold, grad * clip_factor, grad)
                 for grad, threshold, clip_factor in zip(grads, thresholds, clip_factors)]
    return _Clipped(coefficients=k, m_maxes=m_maxes, thresholds=thresholds, gradients=gradients)


def _adagn_and_adam(bucket: Bucket, rule: BucketRule, clipped: _Clipped,
                    norms: Tensors) -> tuple[Tensors, Tensors]:
    """AdaGN on the clipped gradients (`norms`: their whole-tensor norms), then Adam; writes the params and
    state back in their own dtypes and returns (clip thresholds, AdaGN scales)."""
    dtype = bucket.coefficients.dtype
    rounded = _state_rounding(bucket.exp_avgs[0].dtype, dtype)
    k, m_maxes, thresholds, normalized = clipped
    del clipped

    # AdaGN: rescale the clipped gradient to norm c = m_hat / (sqrt(v_hat) + eps), EMAs of its norm and square.
    norms = rounded(norms)
    m_norms = _moving_average(_working(bucket.m_norms, dtype), norms, k.gamma1_scaled, k.one_minus_gamma1_scaled,
                              rounded)
    v_norms = _moving_average(_working(bucket.v_norms, dtype), rounded(torch._foreach_mul(norms, norms)),
                              rule.gamma2, 1.0 - rule.gamma2, rounded)
    norm_denominators = torch._foreach_sqrt(torch._foreach_div(v_norms, k.sq_norm_bias_correction))
    torch._foreach_add_(norm_denominators, rule.eps)
    scales = torch._foreach_div(torch._foreach_div(m_norms, k.norm_bias_correction), norm_denominators)
    # A zero norm leaves the (zero) gradient as it is.
    gains = [torch.where(norm > 0, scale / norm, 1.0) for norm, scale in zip(norms, scales)]
    torch._foreach_mul_(normalized, gains)

    # Adam with decoupled weight decay (applied first; nothing else reads the params).
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
        _working(tensors, dtype) for tensors in (bucket.params, bucket.exp_avgs, bucket.exp_avg_sqs,
                                                 bucket.max_exp_avg_sqs))
    if rule.reset_before:
        torch._foreach_zero_(exp_avgs + exp_avg_sqs + max_exp_avg_sqs)
    if rule.decay:
        torch._foreach_mul_(params, k.decay)
        params = rounded(params)
    torch._foreach_mul_(exp_avgs, k.beta1_scaled)
    exp_avgs = rounded(exp_avgs)
    torch._foreach_addcmul_(exp_avgs, normalized, k.one_minus_beta1_scaled)
    exp_avgs = rounded(exp_avgs)
    torch._foreach_mul_(exp_avg_sqs, rule.beta2)
    exp_avg_sqs = rounded(exp_avg_sqs)
    torch._foreach_addcmul_(exp_avg_sqs, normalized, normalized, value=1.0 - rule.beta2)
    exp_avg_sqs = rounded(exp_avg_sqs)
    del normalized
    second_moments = exp_avg_sqs
    if max_exp_avg_sqs:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second_moments = max_exp_avg_sqs
    denominators = torch._foreach_sqrt(second_moments)
    torch._foreach_mul_(denominators, k.inverse_bias_correction2_sqrt)
    torch._foreach_add_(denominators, rule.eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    del denominators
    torch._foreach_addcmul_(params, updates, torch._foreach_neg(k.step_size))
    if rule.reset_after:
        torch._foreach_zero_(exp_avgs + exp_avg_sqs)

    for stored, working in ((bucket.params, params), (bucket.exp_avgs, exp_avgs),
                            (bucket.exp_avg_sqs, exp_avg_sqs), (bucket.max_exp_avg_sqs, max_exp_avg_sqs),
                            (bucket.m_maxes, m_maxes), (bucket.m_norms, m_norms), (bucket.v_norms, v_norms)):
        if stored and stored[0] is not working[0]:
            torch._foreach_copy_(stored, working)
    return thresholds, scales


def _reduce_sharded(values: list[Tensors], rules: list[BucketRule], op: dist.ReduceOp,
                    group: dist.ProcessGroup) -> list[Tensors]:
    """Per-bucket lists of 0-dim partial statistics, those of sharded buckets reduced in one collective."""
    flat = all_reduce_stacked([value for bucket_values, rule in zip(values, rules) if rule.sharded
                               for value in bucket_values], op, group)
    reduced = []
    for bucket_values, rule in zip(values, rules):
        if rule.sharded:
            bucket_values, flat = flat[:len(bucket_values)], flat[len(bucket_values):]
        reduced.append(bucket_values)
    return reduced


def _shard_abs_max(tensor: torch.Tensor) -> torch.Tensor:
    """`_abs_max` of a shard, 0 for an empty one (a rank can own no rows of a small tensor); |g| >= 0, so 0
    never wins the cross-shard maximum over a non-empty shard."""
    if tensor.numel() == 0:
        return tensor.new_zeros(())
    return _abs_max(tensor)


def _sum_of_squares(tensor: torch.Tensor) -> torch.Tensor:
    """The squared 2-norm (a shard's share of the whole tensor's); compiled, summed over interleaved streams."""
    if torch.compiler.is_compiling():
        return _reduce_streams(tensor.square(), torch.sum, torch.add)
    return torch.linalg.vector_norm(tensor).square()


def _abs_max(tensor: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim tensor, NaN if any entry is NaN; one read of `tensor`, no temporary.

    Compiled, it is an integer max over the bit patterns with the sign bit cleared (non-negative IEEE floats
    sort like their bits, NaNs above inf), which inductor vectorises more cheaply than a float max with NaN
    checks, read as interleaved streams. Eager, `aminmax` is the fastest kernel that needs no |x| temporary.
    """
    if torch.compiler.is_compiling() and tensor.dtype in _SIGN_MASKS:
        int_dtype, magnitude_bits = _SIGN_MASKS[tensor.dtype]
        magnitudes = tensor.view(int_dtype).bitwise_and(magnitude_bits)
        return _reduce_streams(magnitudes, torch.amax, torch.maximum).view(tensor.dtype)
    low, high = torch.aminmax(tensor)
    return torch.maximum(high, low.neg())


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-norm; compiled, summed over interleaved streams (eager: torch's norm, as the original)."""
    if torch.compiler.is_compiling():
        return _reduce_streams(tensor.square(), torch.sum, torch.add).sqrt()
    return torch.linalg.vector_norm(tensor)


def _reduce_streams(tensor: torch.Tensor, reduce: Callable[..., torch.Tensor],
                    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`reduce` over all entries, with the entries viewed as _STREAMS rows read side by side.

    Inductor unrolls the reduction across rows, so each loop iteration reads _STREAMS places of memory at
    once: on CPU that streams about a third faster than one sequential read (more loads in flight).
    """
    flat = tensor.reshape(-1)
    body = flat.numel() - flat.numel() % _STREAMS
    if body == 0:
        return reduce(flat)
    result = reduce(reduce(flat[:body].view(_STREAMS, -1), dim=0))
    if body < flat.numel():
        result = combine(result, reduce(flat[body:]))
    return result


_STREAMS = 4
# float dtype -> (same-width int dtype, all bits but the sign)
_SIGN_MASKS = {torch.float32: (torch.int32, 0x7FFF_FFFF), torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF)}


def _moving_average(averages: Tensors, values: Tensors, decay: Any, one_minus_decay: Any,
                    rounded: Callable[[Tensors], Tensors]) -> Tensors:
    """decay * average + (1 - decay) * value, each product and the sum rounded as the original rounds them."""
    return rounded(torch._foreach_add(rounded(torch._foreach_mul(averages, decay)),
                                      rounded(torch._foreach_mul(values, one_minus_decay))))


def _state_rounding(state_dtype: torch.dtype, dtype: torch.dtype) -> Callable[[Tensors], Tensors]:
    """Rounds compute-dtype tensors to the state dtype (keeping the compute dtype); the identity if they match."""
    if state_dtype == dtype:
        return lambda tensors: tensors
    return lambda tensors: [tensor.to(state_dtype).to(dtype) for tensor in tensors]


def _working(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """The tensors themselves in the compute dtype, else copies in it (written back by the caller)."""
    return [tensor.to(dtype) for tensor in tensors]


def validate_hyperparameters(hparams: dict[str, Any], prefix: str = "") -> None:
    """One-line ValueErrors naming the bad value (prefix says which param group, if any)."""
    validate_non_negative(hparams["lr"], f"{prefix}lr")
    validate_betas(hparams["betas"], f"{prefix}betas")
    validate_non_negative(hparams["eps"], f"{prefix}eps")
    validate_non_negative(hparams["weight_decay"], f"{prefix}weight_decay")
    if hparams["gamma1"] != -1:
        validate_unit_interval(hparams["gamma1"], f"{prefix}gamma1")
    validate_unit_interval(hparams["gamma2"], f"{prefix}gamma2")
    validate_unit_interval(hparams["gamma3"], f"{prefix}gamma3")
    if hparams["total_T"] is not None:
        validate_positive_int(hparams["total_T"], f"{prefix}total_T")
    validate_closed_unit_interval(hparams["eta_min"], f"{prefix}eta_min")
    validate_non_negative_int(hparams["update_proj_gap"], f"{prefix}update_proj_gap")
    validate_variant(hparams["variant"], f"{prefix}variant")


def _saved_variant(group: dict[str, Any], state: dict[Any, dict[str, Any]]) -> str | None:
    """The variant a saved param group ran: its key, or for a state saved before it was one, what its params'
    state shows (only the corrected variant counts `stat_step`); None when the group has no state yet."""
    if "variant" in group:
        return group["variant"]
    saved = [state[i] for i in group["params"] if i in state]
    if not saved:
        return None
    return "corrected" if "stat_step" in saved[0] else "reference"


class StableSPAM(ConfiguredOptimizer):
    """Stable-SPAM, from "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam" (Huang et al., 2025).

    For each param tensor with a gradient, in this order: decoupled weight decay; AdaClip (entries with
    |g| > T, T the bias-corrected EMA of max|g|, are multiplied by T / max|g|); AdaGN (the clipped gradient is
    rescaled to norm c = m_hat / (sqrt(v_hat) + eps), m and v EMAs of its norm and squared norm); the momentum
    reset every `update_proj_gap` steps; Adam with beta1 and gamma1 multiplied by a cosine scale s_t that
    goes from 1 to `eta_min` over `total_T` steps.

    `variant="reference"` (default) reproduces the original trajectories to float32 round-off, quirks
    included. `variant="corrected"` changes four things:
      1. the reset zeroes both moments before they are used and the update uses k = 1 in that same step (the
         original updates the old moments with k = 1 bias corrections and zeroes them for the next step,
         which then uses k = 2);
      2. AdaClip and AdaGN bias corrections use their own never-reset step counter (the original shares the
         reset counter, which inflates the clip threshold and AdaGN's v_hat after every reset);
      3. s_t stays at eta_min after total_T + 1 steps (the original's closed-form cosine is periodic);
      4. amsgrad's running maximum is reset with the moments (the original never resets it).
    Both variants: the global step count is saved by `state_dict()` (as `total_steps` in the first param
    group) so that a resumed run continues exactly; every hyper-parameter is a param-group key (as in
    torch.optim: per group, saved by `state_dict()`; a state saved by the other variant is refused on load);
    `step()` never writes `p.grad` and never syncs with the device; params whose grad is None are skipped
    entirely (no decay, no counter increment, no reset).

    State per param: `step` (Adam's count, reset to 1 at a reset), `stat_step` (corrected only), `exp_avg`,
    `exp_avg_sq`, `max_exp_avg_sq` (amsgrad), the EMAs `m_max` (max|g|), `m_norm` (norm) and `v_norm`
    (squared norm), and for monitoring the latest `clip_threshold` (T) and `norm_scale` (c), 0-dim tensors.
    The arithmetic runs in float32 (float64 for float64 params); state is stored in the param dtype, as in
    the original, or in float32 with `fp32_state=True`. With bf16 state the moving averages and the params
    are rounded to bf16 where the original's operations round them, so they stall where the original's do
    (docs/algorithms.md#a5-9); the clipped and normalised gradient stays float32 (a round-off difference).

    Sharded params (FSDP2's DTensors) are updated shard by shard, with max|g| and the clipped gradient's
    norm taken over the whole tensor: every tensor's partial values are reduced across the shard group in one
    all_reduce(MAX) and one all_reduce(SUM) per step (also with `compile=True`, which traces them). Their
    moments are DTensors sharded like the param, so torch.distributed.checkpoint gathers and re-shards them.

    Args:
        params: parameters or param groups (the original trains one group with every parameter).
        lr: learning rate (per group).
        betas: Adam's decay rates (beta1, beta2) (per group); beta1 is multiplied by s_t.
        eps: added to Adam's denominator and to AdaGN's (per group).
        weight_decay: decoupled weight decay p <- p * (1 - lr * weight_decay), before the update (per group).
        amsgrad: normalise by the running maximum of Adam's second moment (per group).
        gamma1: AdaGN decay rate of the norm EMA, multiplied by s_t; -1 means the group's betas[0] (per group).
        gamma2: AdaGN decay rate of the squared-norm EMA (per group).
        gamma3: AdaClip decay rate of the max|g| EMA (theta in the paper) (per group).
        total_T: length in steps of the cosine scale s_t; None keeps s_t = 1 (per group).
        eta_min: the lowest value of s_t (per group).
        update_proj_gap: reset Adam's moments at every multiple of this many global steps; 0 never resets
            (per group).
        variant: "reference" (the original's numbers) or "corrected" (bugs fixed, see above) (per group).
        maximize: step along the gradient instead of against it (per group), as torch.optim's `maximize`.
        foreach: None or True; params are always updated as lists grouped by device and dtype.
        compile: run the update core through `torch.compile(fullgraph=True)`.
        fp32_state: keep moments and EMAs of bf16/fp16 params in float32 (the original keeps the param dtype).
        state_bits: 8 stores exp_avg and exp_avg_sq of tensors with at least 4096 entries as blockwise 8-bit
            codes (galore_torch.blockwise8bit), dequantized to the state dtype for each step's update and
            requantized after it (compiled too with `compile`); 32 (default) keeps them as they are. Not for
            sharded params.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        total_T: int | None = None,
        eta_min: float = 0.5,
        update_proj_gap: int = 1000,
        variant: str = "reference",
        maximize: bool = False,
        foreach: bool | None = None,
        compile: bool = False,
        fp32_state: bool = False,
        state_bits: int = 32,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "gamma1": gamma1, "gamma2": gamma2, "gamma3": gamma3, "total_T": total_T, "eta_min": eta_min,
                    "update_proj_gap": update_proj_gap, "variant": variant, "maximize": maximize}
        validate_hyperparameters(defaults)
        if foreach not in (None, True):
            raise ValueError(f"invalid foreach: {foreach!r} (StableSPAM only has the multi-tensor "
                             "implementation; pass None or True)")
        validate_state_bits(state_bits)
        # state_bits only when 8, so that 32-bit optimizers carry (and pickle) the settings they always did
        self._configure({"compile": compile, "fp32_state": fp32_state}
                        | ({"state_bits": 8} if state_bits == 8 else {}))
        super().__init__(params, defaults)
        # Kept in the first group so that state_dict() carries it and `state` holds only per-param entries
        # (torch.distributed.checkpoint maps every state key to a param).
        self.param_groups[0]["total_steps"] = 0

    def _configure(self, settings: dict[str, Any]) -> None:
        """Set the settings that are not hyper-parameters, and the core."""
        self.settings = settings
        self.fp32_state = settings["fp32_state"]
        self.state_bits = settings.get("state_bits", 32)
        self._core: Callable[..., list[tuple[Tensors, Tensors]]] = update_buckets
        if settings["compile"]:
            self._core = compile_core(update_buckets)

    @property
    def total_steps(self) -> int:
        """Number of completed `step()` calls: the t of s_t and of the reset gate."""
        return self.param_groups[0]["total_steps"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every param with a gradient; returns the closure's loss (None without a closure)."""
        loss = evaluate_closure(closure)
        t = self.total_steps + 1
        self.param_groups[0]["total_steps"] = t
        members, buckets, rules, shard_groups = [], [], [], set()
        for group_index, group in enumerate(self.param_groups):
            corrected = group["variant"] == "corrected"
            scale = cosine_scale(t, group["total_T"], group["eta_min"], clamp=corrected)
            reset = group["update_proj_gap"] != 0 and t % group["update_proj_gap"] == 0
            for (_, _, process_group), entries in self._advance_counters(group_index, group, reset).items():
                members.append(entries)
                buckets.append(self._bucket(group, entries, scale))
                rules.append(BucketRule(
                    theta=group["gamma3"], gamma2=group["gamma2"], beta2=group["betas"][1], eps=group["eps"],
                    decay=group["weight_decay"] != 0, reset_before=reset and corrected,
                    reset_after=reset and not corrected, maximize=group["maximize"],
                    sharded=process_group is not None,
                ))
                shard_groups.add(process_group)
        if not buckets:
            return loss
        shard_groups.discard(None)
        if len(shard_groups) > 1:
            raise ValueError("StableSPAM params are sharded over different process groups; shard them all "
                             "over one device mesh (one fully_shard mesh for the whole model)")
        results = self._run_core(buckets, rules, shard_groups.pop() if shard_groups else None)
        for entries, bucket in zip(members, buckets):
            store_moments([state for _, state, _ in entries], bucket.exp_avgs, bucket.exp_avg_sqs,
                          self.settings["compile"])
        for entries, (thresholds, scales) in zip(members, results):
            for (p, state, _), threshold, norm_scale in zip(entries, thresholds, scales):
                state["clip_threshold"] = threshold.to(self._state_dtype(p))
                state["norm_scale"] = norm_scale.to(self._state_dtype(p))
        return loss

    def _run_core(self, buckets: list[Bucket], rules: list[BucketRule],
                  shard_group: dist.ProcessGroup | None) -> list[tuple[Tensors, Tensors]]:
        """The core over every bucket; compiled over whole tensors, one layer-sized chunk at a time, so its
        compile cost does not grow with depth (galore_torch.chunking). Shards stay together: their statistics
        are reduced across ranks in one collective per step."""
        if not self.settings["compile"] or shard_group is not None:
            return self._core(buckets, rules, shard_group)
        return run_in_chunks(self._core, buckets, rules, merge_per_tensor)

    @torch.no_grad()
    def metrics(self) -> dict[str, torch.Tensor]:
        """What the last step measured, as 0-dim device tensors (no host sync): AdaClip's threshold T and
        AdaGN's scale c summarised over the params as `stablespam/{clip_threshold,norm_scale}_{mean,min,max}`;
        {} before the first step."""
        result = {}
        for key in ("clip_threshold", "norm_scale"):
            found = [state[key] for state in self.state.values() if key in state]
            if found:
                stacked = torch.stack([value.to(device=found[0].device, dtype=torch.float32) for value in found])
                result |= {f"stablespam/{key}_mean": stacked.mean(), f"stablespam/{key}_min": stacked.amin(),
                           f"stablespam/{key}_max": stacked.amax()}
        return result

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's own hyper-parameters, then add it."""
        validate_hyperparameters({**self.defaults, **param_group}, f"param group {len(self.param_groups)} ")
        super().add_param_group(param_group)

    def _advance_counters(self, group_index: int, group: dict[str, Any], reset: bool) -> dict[tuple, list[Member]]:
        """Step the counters of the group's params with a gradient; returns (param, state, AdaClip/AdaGN
        count) per device, dtype and shard group (None for whole tensors). Adam's count `step` restarts at 1
        on a reset step. AdaClip and AdaGN count with it (before the reset) in the reference, with their own
        `stat_step` in the corrected variant."""
        entries: dict[tuple, list[Member]] = {}
        for param_index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            reject_complex_param("StableSPAM", p, param_index, group_index)
            reject_sparse_grad("StableSPAM", p.grad, param_index, group_index)
            state = self.state[p]
            if "exp_avg" not in state:
                self._init_state(state, p, group)
            if group["variant"] == "corrected":
                state["stat_step"] += 1
                stat_step = state["stat_step"]
            else:
                stat_step = state["step"] + 1
            state["step"] = 1 if reset else state["step"] + 1
            entries.setdefault((p.device, p.dtype, shard_group(p)), []).append((p, state, stat_step))
        return entries

    def _bucket(self, group: dict[str, Any], entries: list[Member], scale: float) -> Bucket:
        """The core's input for params of one device and dtype, with the step's numbers computed in the
        original's float order. Sharded params (DTensors) enter as their local shards."""
        lr, (beta1, beta2), theta, gamma2 = group["lr"], group["betas"], group["gamma3"], group["gamma2"]
        gamma1 = beta1 if group["gamma1"] == -1 else group["gamma1"]
        gamma1_scaled, beta1_scaled = gamma1 * scale, beta1 * scale
        columns = []
        for _, state, stat_step in entries:
            columns.append(Coefficients(
                decay=1 - lr * group["weight_decay"],
                gamma1_scaled=gamma1_scaled,
                one_minus_gamma1_scaled=1 - gamma1_scaled,
                beta1_scaled=beta1_scaled,
                one_minus_beta1_scaled=1 - beta1_scaled,
                clip_bias_correction=1 - theta**stat_step,
                norm_bias_correction=1 - gamma1_scaled**stat_step,
                sq_norm_bias_correction=1 - gamma2**stat_step,
                step_size=lr / (1 - beta1_scaled ** state["step"]),
                inverse_bias_correction2_sqrt=1 / math.sqrt(1 - beta2 ** state["step"]),
            ))
        p = entries[0][0]
        # pinned, so that the copy to a GPU is asynchronous
        coefficients = torch.tensor(list(zip(*columns)), dtype=torch.promote_types(p.dtype, torch.float32),
                                    pin_memory=p.device.type == "cuda").to(p.device, non_blocking=True)
        states = [state for _, state, _ in entries]
        # 8-bit moments: s_t scales beta1 down to eta_min * beta1, within the bound's range
        moments = [load_moments(state, self._state_dtype(p), first_moment_bound(beta1, beta2),
                                compile=self.settings["compile"]) for p, state, _ in entries]
        return Bucket(
            params=[local(p) for p, _, _ in entries],
            grads=[local(p.grad) for p, _, _ in entries],
            exp_avgs=[local(exp_avg) for exp_avg, _ in moments],
            exp_avg_sqs=[local(exp_avg_sq) for _, exp_avg_sq in moments],
            max_exp_avg_sqs=[local(state["max_exp_avg_sq"]) for state in states] if group["amsgrad"] else [],
            m_maxes=[state["m_max"] for state in states],
            m_norms=[state["m_norm"] for state in states],
            v_norms=[state["v_norm"] for state in states],
            coefficients=coefficients,
        )

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The param dtype, or float32 for bf16/fp16 params with `fp32_state`."""
        return torch.promote_types(p.dtype, torch.float32) if self.fp32_state else p.dtype

    def _init_state(self, state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        dtype = self._state_dtype(p)
        state["step"] = 0
        if group["variant"] == "corrected":
            state["stat_step"] = 0
        validate_state_bits(self.state_bits, sharded=shard_group(p) is not None)
        if self.state_bits == 8 and p.numel() >= MIN_8BIT_SIZE:
            init_moments_8bit(state, p)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        for key in ("m_max", "m_norm", "v_norm"):
            state[key] = torch.zeros((), dtype=dtype, device=p.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then undo torch's cast of every state tensor to the param dtype so that float32 state of
        bf16 params stays float32. Copies the tensors so the loaded dict is never aliased. Whole-shape moments
        of sharded params (a gathered checkpoint) are cut to this rank's shard. A group saved by the other
        variant is refused; one saved before the hyper-parameters were group keys gets the constructor's."""
        if "total_steps" not in state_dict["param_groups"][0]:
            raise ValueError("this optimizer state has no total_steps in its first param group: it was not "
                             "saved by StableSPAM.state_dict()")
        check_variants_match("StableSPAM", self.param_groups,
                             [_saved_variant(group, state_dict["state"]) for group in state_dict["param_groups"]])
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            state = self.state[p]
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    state[key] = shard_like(value.to(device=p.device, dtype=self._state_dtype(p), copy=True), p)
            restore_8bit_state(state, state_dict["state"].get(saved_id, {}), p.device)

