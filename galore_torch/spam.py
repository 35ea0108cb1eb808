"""SPAM: Adam with periodic momentum reset, spike-aware gradient clipping and optional sparse momentum.

The step is split in two: host-side bookkeeping on Python ints (counters, reset/clip gates, mask refresh) and
a device-side functional core over lists of tensors (`update_buckets`) that never syncs and that
`torch.compile(fullgraph=True)` can compile. Reference behaviour and quirks: docs/algorithms.md#b.
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
    validate_group_hyperparameters,
    validate_density,
    validate_non_negative,
    validate_non_negative_int,
    validate_variant,
)
from galore_torch.blockwise8bit import (
    MIN_8BIT_SIZE,
    first_moment_bound,
    init_moments_8bit,
    load_moment,
    load_moments,
    restore_8bit_state,
    store_moment,
    store_moments,
    validate_state_bits,
)
from galore_torch.chunking import compile_core, merge_sum, run_in_chunks
from galore_torch.sharded import all_reduce_stacked, local, shard_group, shard_like

# The post-reset warm-up starts at 1 - WARMUP_PEAK (0.01) and ramps to 1 along a half cosine.
WARMUP_PEAK = 0.99


def warmup_scale(current_step: int, warmup_epoch: int) -> float:
    """Multiplier of the update `current_step` steps after a mask refresh: 0.01 at 0, 1 from `warmup_epoch` on.

    Written the way the reference's CosineAnnealingLR closed form evaluates it, so the floats match bit for bit.
    """
    if current_step >= warmup_epoch:
        return 1.0
    return 1.0 - WARMUP_PEAK * (1 + math.cos(math.pi * current_step / (warmup_epoch + 1))) / 2


def exact_count_mask(shape: torch.Size, density: float) -> torch.Tensor:
    """Initial sparse-momentum mask: exactly int(density * numel) True entries from one global-RNG randperm (CPU)."""
    rows, cols = shape
    total = rows * cols
    count = min(int(density * total), total)
    mask = torch.zeros(total, dtype=torch.bool)
    if count > 0:
        mask[torch.randperm(total)[:count]] = True
    return mask.view(rows, cols)


class BucketRule(NamedTuple):
    """What the core does to one bucket; all fields are constants, so a compiled core guards on them cheaply."""

    beta1: float
    beta2: float
    eps: float
    threshold: float
    clip: bool  # spike clipping active this step
    spare_zero_v: bool  # corrected variant: entries with v == 0 are never spikes
    masked: bool  # sparse momentum with density < 1: only masked entries are read and updated
    decay: str  # "none", "all" or "masked" (weight decay of the masked entries only)
    maximize: bool  # step along +grad: the update of -grad


class Bucket(NamedTuple):
    """Parameters updated together: same group, device, dtype, per-parameter step count and masking."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    masks: list[torch.Tensor] | None  # bool, or a bfloat16 0/1 copy for a compiled core (see SPAM._core_mask)
    scalars: torch.Tensor  # [lr * bias correction * warm-up scale, lr * weight_decay], on the bucket's device


def clip_spikes(grads: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], threshold: float,
                spare_zero_v: bool) -> list[torch.Tensor]:
    """Entries with g^2 > threshold * v become sign(g) * sqrt(threshold * v), against the pre-update v.

    Computed as copysign(min(|g|, sqrt(threshold * v)), g): the same rule without a boolean mask. With
    `spare_zero_v` an entry whose v is 0 keeps its gradient; without it (the reference) it is clipped to 0.
    """
    caps = torch._foreach_mul(exp_avg_sqs, threshold)
    torch._foreach_sqrt_(caps)
    if spare_zero_v:
        caps = [torch.where(v > 0, cap, math.inf) for cap, v in zip(caps, exp_avg_sqs)]
    magnitudes = torch._foreach_abs(grads)
    torch._foreach_minimum_(magnitudes, caps)
    return [magnitude.copysign_(grad) for magnitude, grad in zip(magnitudes, grads)]


def update_bucket(bucket: Bucket, rule: BucketRule) -> torch.Tensor:
    """One SPAM update of a bucket in place; returns the float32 sum of squares of the clipped gradients.

    Reads `grads` without writing them. Moments are full-shape; for masked buckets their unmasked entries
    stay 0 and the unmasked parameter entries are left untouched.
    """
    grads = bucket.grads
    state_dtype = bucket.exp_avgs[0].dtype
    if grads[0].dtype != state_dtype:
        grads = [grad.to(state_dtype) for grad in grads]
    if rule.maximize:  # exact, and before masking, so the core sees exactly what minimizing on -grad would
        grads = torch._foreach_neg(grads)
    if rule.masked:
        masks = [mask if mask.dtype == torch.bool else mask > 0 for mask in bucket.masks]
        grads = [torch.where(mask, grad, 0.0) for mask, grad in zip(masks, grads)]
    if rule.clip:
        grads = clip_spikes(grads, bucket.exp_avg_sqs, rule.threshold, rule.spare_zero_v)
    # Per-tensor vector_norm rather than _foreach_norm: compiled, it fuses with the clipping instead of needing
    # the clipped gradients written to memory for an opaque kernel.
    norm_dtype = torch.promote_types(state_dtype, torch.float32)
    norms = [torch.linalg.vector_norm(grad, 2, dtype=norm_dtype) for grad in grads]
    squared_norm = torch.stack(norms).square().sum().float()

    torch._foreach_mul_(bucket.exp_avgs, rule.beta1)
    torch._foreach_add_(bucket.exp_avgs, grads, alpha=1.0 - rule.beta1)
    torch._foreach_mul_(bucket.exp_avg_sqs, rule.beta2)
    torch._foreach_addcmul_(bucket.exp_avg_sqs, grads, grads, value=1.0 - rule.beta2)
    denominators = torch._foreach_sqrt(bucket.exp_avg_sqs)
    torch._foreach_add_(denominators, rule.eps)
    updates = torch._foreach_div(bucket.exp_avgs, denominators)
    del denominators
    if rule.masked:
        updates = [torch.where(mask, update, 0.0) for mask, update in zip(masks, updates)]
    torch._foreach_mul_(updates, bucket.scalars[0])
    torch._foreach_sub_(bucket.params, updates)
    del updates

    if rule.decay != "none":
        decays = torch._foreach_mul(bucket.params, bucket.scalars[1])
        if rule.decay == "masked":
            decays = [torch.where(mask, decay, 0.0) for mask, decay in zip(masks, decays)]
        torch._foreach_sub_(bucket.params, decays)
    return squared_norm


def update_buckets(buckets: list[Bucket], rules: list[BucketRule]) -> list[torch.Tensor]:
    """The functional core of one step: `update_bucket` over every bucket (the unit that gets compiled)."""
    return [update_bucket(bucket, rule) for bucket, rule in zip(buckets, rules)]


def validate_hyperparameters(hparams: dict[str, Any], prefix: str = "") -> None:
    """SPAM's own keys, one-line ValueErrors naming the bad value (prefix says which param group, if any)."""
    validate_non_negative_int(hparams["warmup_epoch"], f"{prefix}warmup_epoch")
    validate_non_negative(hparams["threshold"], f"{prefix}threshold")
    validate_non_negative_int(hparams["grad_accu_steps"], f"{prefix}grad_accu_steps")
    validate_variant(hparams["variant"], f"{prefix}variant")


def _has_period(gap: int | None) -> bool:
    """None (no density group) and 0 both mean: no momentum reset, no warm-up, no mask refresh."""
    return gap is not None and gap > 0


class SPAM(ConfiguredOptimizer):
    """SPAM, from "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training" (Huang et al., 2025).

    Adam (eps outside the square root, not bias-corrected) plus: every `update_proj_gap` steps both moments
    are zeroed and the update is scaled by a cosine warm-up from 0.01 to 1 over `warmup_epoch` steps; gradient
    entries with g^2 > threshold * v (pre-update v) are clipped to sign(g) * sqrt(threshold * v) once
    `grad_accu_steps` steps have passed since the start or a reset; decoupled weight decay after the update.

    Sparse momentum (configured exactly like the original): give one param group both `density` and
    `update_proj_gap`, e.g. `[{"params": rest}, {"params": matrices, "density": 1.0, "update_proj_gap": 500}]`.
    Its 2-D params keep moments for a random subset of entries (exactly int(density * numel) at construction
    from `torch.randperm`, then a fresh `torch.rand(shape) < density` mask one step before each reset, both on
    the global RNG, which the caller checkpoints); unmasked entries are not updated. Params of other shapes in
    that group are treated like those of a regular group (dense moments, weight decay). The density group's
    period drives resets, warm-up and mask refresh of *all* groups (as in the original, a group listed before
    it uses the previous step's period). Without a density group, or with `update_proj_gap=0` (on which the
    original divides by zero), there is no reset, no warm-up and no refresh: only clipping.

    `variant="reference"` reproduces the original trajectories, quirks included: the bias-correction step
    count is never reset, density-group weight decay is a no-op, and while clipping is active an entry whose
    v is 0 is clipped to 0 and stays frozen. `variant="corrected"` decays the masked entries of density params
    and never treats an entry with v == 0 as a spike. Both variants: `step()` returns the loss (the original
    returned a tuple), never writes `p.grad`, and leaves the post-clipping global gradient norm (masked entries
    only, a 0-dim float32 tensor on the first param's device; None before the first step) in `last_grad_norm`.
    The step counters live in `param_groups[0]`, so `state_dict()` round-trips them, and every hyper-parameter
    is a param-group key (as in torch.optim: saved by `state_dict()`; a state saved by the other variant is
    refused on load). All but `warmup_epoch` may differ between groups: the warm-up follows the one
    optimizer-wide step count since the last reset.

    Sharded params (FSDP2's DTensors) are updated shard by shard (the update is entry-wise); masks are drawn
    for the whole shape on every rank, which keeps its slice, so they equal the unsharded run's when the ranks'
    RNGs are seeded alike (as DDP needs too). `last_grad_norm` is over whole tensors: one all_reduce per step.

    Args:
        params: parameters or param groups; a group with `density` must also have `update_proj_gap`.
        lr: learning rate.
        betas: decay rates of the first and second moment.
        eps: added to sqrt(v) (not bias-corrected).
        weight_decay: decoupled weight decay, applied after the update and not scaled by the warm-up.
        correct_bias: multiply lr by sqrt(1 - beta2^k) / (1 - beta1^k), k = the per-param step count.
        warmup_epoch: length in steps of the post-reset cosine warm-up of the update.
        threshold: spike threshold on g^2 / v; 0 disables clipping.
        grad_accu_steps: steps after the start and after each reset during which clipping is off.
        variant: "reference" (the original's numbers) or "corrected" (bugs fixed, see above).
        maximize: step along the gradient instead of against it, as torch.optim's `maximize`.
        foreach: None or True updates params as lists grouped by device and dtype; False one at a time
            (lower peak memory).
        compile: run the update core through `torch.compile(fullgraph=True)`.
        fp32_state: keep moments in float32 whatever the param dtype (the original keeps the param dtype).
        state_bits: 8 stores exp_avg and exp_avg_sq of tensors with at least 4096 entries as blockwise 8-bit
            codes (galore_torch.blockwise8bit), dequantized to the state dtype for each step's update and
            requantized after it (compiled too with `compile`); 32 (default) keeps them as they are. Not for
            sharded params.
        no_deprecation_warning: accepted for compatibility with the original and ignored.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        warmup_epoch: int = 150,
        threshold: float = 2000,
        grad_accu_steps: int = 20,
        variant: str = "reference",
        maximize: bool = False,
        foreach: bool | None = None,
        compile: bool = False,
        fp32_state: bool = False,
        state_bits: int = 32,
        no_deprecation_warning: bool = False,
    ):
        validate_non_negative(lr, "lr")
        validate_betas(betas)
        validate_non_negative(eps, "eps")
        validate_non_negative(weight_decay, "weight_decay")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias, "warmup_epoch": warmup_epoch, "threshold": threshold,
                    "grad_accu_steps": grad_accu_steps, "variant": variant, "maximize": maximize}
        validate_hyperparameters(defaults)
        validate_state_bits(state_bits)
        # state_bits only when 8, so that 32-bit optimizers carry (and pickle) the settings they always did
        self._configure({"foreach": foreach is not False, "compile": compile, "fp32_state": fp32_state}
                        | ({"state_bits": 8} if state_bits == 8 else {}))
        super().__init__(params, defaults)
        # The original's two global counters; kept in the first group so that state_dict() carries them and
        # `state` holds only per-param entries (torch.distributed.checkpoint maps every state key to a param).
        self.param_groups[0]["total_step"] = 0
        self.param_groups[0]["current_step"] = warmup_epoch + 1

    def _configure(self, settings: dict[str, Any]) -> None:
        """Set the settings that are not hyper-parameters, and the core."""
        self.settings = settings
        self.foreach = settings["foreach"]
        self.fp32_state = settings["fp32_state"]
        self.state_bits = settings.get("state_bits", 32)
        self.last_grad_norm: torch.Tensor | None = None
        self._mask_copies: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        self._core: Callable[[list[Bucket], list[BucketRule]], list[torch.Tensor]] = update_buckets
        if settings["compile"]:
            self._core = compile_core(update_buckets)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group, add it, and draw the masks of its 2-D params if it is a density group."""
        index = len(self.param_groups)
        merged = {**self.defaults, **param_group}
        validate_group_hyperparameters(merged, index)
        validate_hyperparameters(merged, f"param group {index} ")
        if merged["warmup_epoch"] != self.defaults["warmup_epoch"]:
            raise ValueError(f"invalid param group {index} warmup_epoch: {merged['warmup_epoch']!r} (the warm-up "
                             "is optimizer-wide; set warmup_epoch in the constructor)")
        if ("density" in param_group) != ("update_proj_gap" in param_group):
            raise ValueError(f"param group {index}: density and update_proj_gap go together (sparse momentum "
                             f"needs both, e.g. {{'density': 1.0, 'update_proj_gap': 500}})")
        if "density" in param_group:
            validate_density(param_group["density"], f"param group {index} density")
            validate_non_negative_int(param_group["update_proj_gap"], f"param group {index} update_proj_gap")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._init_moments(p)
        if "density" in group:
            for p in group["params"]:
                if p.dim() == 2:
                    self.state[p]["mask"] = shard_like(exact_count_mask(p.shape, group["density"]).to(p.device), p)

    def _init_moments(self, p: torch.Tensor) -> None:
        """Zero moments and step count. Made at construction, not at the first step: the state is then
        complete from the start, as torch.distributed.checkpoint's loader needs (it only fills in the state
        of an optimizer with none, and the masks are there from construction)."""
        state = self.state[p]
        state["step"] = 0
        validate_state_bits(self.state_bits, sharded=shard_group(p) is not None)
        if self.state_bits == 8 and p.numel() >= MIN_8BIT_SIZE:
            init_moments_8bit(state, p)
            return
        state["exp_avg"] = torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])

    @property
    def total_step(self) -> int:
        """Number of completed `step()` calls."""
        return self.param_groups[0]["total_step"]

    @property
    def current_step(self) -> int:
        """Steps since the last mask refresh (warmup_epoch + 1 before the first one): drives the warm-up."""
        return self.param_groups[0]["current_step"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every param with a gradient; returns the closure's loss (None without a closure)."""
        loss = evaluate_closure(closure)
        n = self.total_step + 1
        scale = warmup_scale(self.current_step, self.param_groups[0]["warmup_epoch"])
        buckets, rules, shard_groups, bucket_states = self._prepare_buckets(n, scale)
        squared_norms = self._run_core(buckets, rules) if buckets else []
        for bucket, states in zip(buckets, bucket_states):
            store_moments(states, bucket.exp_avgs, bucket.exp_avg_sqs, self.settings["compile"])
        self._record_grad_norm(squared_norms, shard_groups)

        self.param_groups[0]["total_step"] += 1
        self.param_groups[0]["current_step"] += 1
        gap = self._last_density_gap()
        if _has_period(gap) and (self.total_step + 1) % gap == 0:
            self._refresh_masks()
            self.param_groups[0]["current_step"] = 0
        return loss

    def _run_core(self, buckets: list[Bucket], rules: list[BucketRule]) -> list[torch.Tensor]:
        """The core over every bucket; compiled, one layer-sized chunk at a time, so its compile cost does not
        grow with depth (galore_torch.chunking). SPAM's update is entry-wise, so shards may be cut too."""
        if not self.settings["compile"]:
            return self._core(buckets, rules)
        return run_in_chunks(self._core, buckets, rules, merge_sum)

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self.fp32_state and p.is_floating_point() else p.dtype

    def _last_density_gap(self) -> int | None:
        """Period of the last density group, or None without one."""
        gaps = [group["update_proj_gap"] for group in self.param_groups if "density" in group]
        return gaps[-1] if gaps else None

    def _prepare_buckets(self, n: int, scale: float) -> tuple[list[Bucket], list[BucketRule], list, list]:
        """Host side of step n: per-param counters, moment resets, gates, and the buckets for the core, with
        the process group each bucket is sharded over (None for whole tensors) and its params' states. Sharded
        params (DTensors) enter as their local shards: SPAM's update is entry-wise, so shards need no communication.

        The period in force while visiting a group is that of the last density group visited before it, as in
        the original; groups before the first density group use the previous step's (none at step 1).
        """
        gap = self._last_density_gap() if n > 1 else None
        members: dict[tuple, list[tuple[torch.Tensor, dict]]] = {}
        group_clips: list[bool] = []
        to_reset: list[torch.Tensor] = []
        for group_index, group in enumerate(self.param_groups):
            if "density" in group:
                gap = group["update_proj_gap"]
            reset = _has_period(gap) and n % gap == 0
            clip = (group["threshold"] != 0 and n >= group["grad_accu_steps"]
                    and (not _has_period(gap) or n % gap >= group["grad_accu_steps"]))
            group_clips.append(clip)
            for param_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                reject_complex_param("SPAM", p, param_index, group_index)
                reject_sparse_grad("SPAM", p.grad, param_index, group_index)
                state = self.state[p]
                if "exp_avg" not in state:  # a param whose state a loaded state_dict lacked
                    self._init_moments(p)
                if reset:  # 8-bit moments: zero codes with a zero absmax decode to 0
                    to_reset += [state[key] for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax",
                                                        "exp_avg_sq_absmax") if key in state]
                state["step"] += 1
                masked = "mask" in state and group["density"] < 1.0
                key = (group_index, masked, "mask" in state, p.device, p.dtype, state["step"], shard_group(p),
                       None if self.foreach else param_index)
                members.setdefault(key, []).append((p, state))
        if to_reset:
            torch._foreach_zero_(to_reset)

        buckets, rules, shard_groups, bucket_states = [], [], [], []
        for (group_index, masked, is_density_param, device, dtype, step, process_group, _), entries in \
                members.items():
            group = self.param_groups[group_index]
            rule = self._bucket_rule(group, group_clips[group_index], masked, is_density_param)
            moments = [load_moments(state, self._state_dtype(p), first_moment_bound(*group["betas"]),
                                    compile=self.settings["compile"]) for p, state in entries]
            # Step-dependent scalars travel as a tensor (a compiled core does not recompile when they change);
            # built on the host and copied without blocking, so no device sync.
            scalars = torch.tensor([self._step_size(group, step) * scale, group["lr"] * group["weight_decay"]],
                                   dtype=torch.promote_types(dtype, torch.float32)).to(device, non_blocking=True)
            buckets.append(Bucket(
                params=[local(p) for p, _ in entries],
                grads=[local(p.grad) for p, _ in entries],
                exp_avgs=[local(exp_avg) for exp_avg, _ in moments],
                exp_avg_sqs=[local(exp_avg_sq) for _, exp_avg_sq in moments],
                masks=[self._core_mask(p, local(state["mask"])) for p, state in entries] if masked else None,
                scalars=scalars,
            ))
            rules.append(rule)
            shard_groups.append(process_group)
            bucket_states.append([state for _, state in entries])
        return buckets, rules, shard_groups, bucket_states

    def _core_mask(self, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mask as the core reads it: the bool mask itself, or for a compiled core a cached bfloat16 copy
        (inductor's CPU code loads bool tensors several times slower than 16-bit ones; ~5x on this machine)."""
        if not self.settings["compile"]:
            return mask
        source, copy = self._mask_copies.get(p, (None, None))
        if source is not mask:
            copy = mask.to(torch.bfloat16)
            self._mask_copies[p] = (mask, copy)
        return copy

    def _bucket_rule(self, group: dict[str, Any], clip: bool, masked: bool, is_density_param: bool) -> BucketRule:
        """Weight decay: off at 0; for density params a no-op in the reference, masked entries in corrected."""
        if group["weight_decay"] <= 0 or (is_density_param and group["variant"] == "reference"):
            decay = "none"
        else:
            decay = "masked" if masked else "all"
        beta1, beta2 = group["betas"]
        return BucketRule(beta1=beta1, beta2=beta2, eps=group["eps"], threshold=float(group["threshold"]),
                          clip=clip, spare_zero_v=group["variant"] == "corrected", masked=masked, decay=decay,
                          maximize=group["maximize"])

    @staticmethod
    def _step_size(group: dict[str, Any], step: int) -> float:
        """lr with Adam's bias correction for per-param step `step`, in the original's float order."""
        step_size = group["lr"]
        if group["correct_bias"]:
            beta1, beta2 = group["betas"]
            step_size *= math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return step_size

    def _record_grad_norm(self, squared_norms: list[torch.Tensor], shard_groups: list) -> None:
        """The norm over whole tensors: the shards' squared norms are summed across ranks in one collective."""
        device = next(p for group in self.param_groups for p in group["params"]).device
        whole = torch.zeros((), dtype=torch.float32, device=device)
        sharded = torch.zeros((), dtype=torch.float32, device=device)
        for squared_norm, process_group in zip(squared_norms, shard_groups):
            if process_group is None:
                whole = whole + squared_norm.to(device)
            else:
                sharded = sharded + squared_norm.to(device)
        groups = set(shard_groups) - {None}
        if len(groups) > 1:
            raise ValueError("SPAM params are sharded over different process groups; shard them all over one "
                             "device mesh (one fully_shard mesh for the whole model)")
        if groups:
            (sharded,) = all_reduce_stacked([sharded], dist.ReduceOp.SUM, groups.pop())
            whole = whole + sharded
        self.last_grad_norm = whole.sqrt()

    def metrics(self) -> dict[str, torch.Tensor]:
        """What the last step measured, as 0-dim device tensors (no host sync): the post-clipping gradient
        norm (`last_grad_norm`) under `spam/grad_norm_afterclip`; {} before the first step."""
        return {} if self.last_grad_norm is None else {"spam/grad_norm_afterclip": self.last_grad_norm}

    def _refresh_masks(self) -> None:
        """New Bernoulli masks for every density param (group order); moments keep the entries in both masks."""
        for group in self.param_groups:
            if "density" not in group:
                continue
            for p in group["params"]:
                state = self.state[p]
                if "mask" not in state:
                    continue
                # drawn whole on every rank (identically seeded RNGs), each rank keeping its shard
                new_mask = shard_like(torch.rand(p.shape, device=p.device) < group["density"], p)
                state["mask"] = new_mask
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state and state[key].dtype == torch.uint8:
                        store_moment(state, key, torch.where(new_mask, load_moment(state, key), 0.0))
                    elif key in state:
                        state[key] = torch.where(new_mask, state[key], 0.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then undo torch's cast of every state tensor to the param dtype: masks stay bool and
        fp32 moments stay float32. Copies the tensors so the loaded dict is never aliased. Whole-shape state
        of sharded params (a gathered checkpoint) is cut to this rank's shard. A group saved by the other
        variant is refused; one saved before the hyper-parameters were group keys gets the constructor's."""
        check_variants_match("SPAM", self.param_groups,
                             [group.get("variant") for group in state_dict["param_groups"]])
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            if "mask" in saved:
                state["mask"] = shard_like(saved["mask"].to(device=p.device, dtype=torch.bool, copy=True), p)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    state[key] = shard_like(saved[key].to(device=p.device, dtype=self._state_dtype(p), copy=True), p)
            restore_8bit_state(state, saved, p.device)
