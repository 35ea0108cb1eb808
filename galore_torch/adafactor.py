"""Adafactor as the StableSPAM paper's baseline ran it: transformers' semantics, written for torch alone."""

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from galore_torch.base import (
    evaluate_closure,
    reject_complex_param,
    reject_sparse_grad,
    validate_non_negative,
    validate_unit_interval,
)

# Params stored in half precision are updated in fp32 and copied back, so small updates are not rounded away.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def validate_adafactor_hyperparameters(hparams: dict, prefix: str = "") -> None:
    """One-line ValueErrors naming the bad value (prefix says which param group, if any)."""
    lr, relative_step = hparams["lr"], hparams["relative_step"]
    if lr is None and not relative_step:
        raise ValueError(f"invalid {prefix}lr: None needs relative_step=True; pass a learning rate")
    if lr is not None and relative_step:
        raise ValueError(f"invalid {prefix}lr: {lr!r} with relative_step=True (the step size is derived from "
                         "the step count); pass lr=None or relative_step=False")
    if hparams["warmup_init"] and not relative_step:
        raise ValueError(f"invalid {prefix}warmup_init: True needs relative_step=True")
    if lr is not None:
        validate_non_negative(lr, f"{prefix}lr")
    eps = hparams["eps"]
    if len(eps) != 2:
        raise ValueError(f"invalid {prefix}eps: {eps!r} (expected two values: (eps_squared_grad, eps_scale))")
    for i, value in enumerate(eps):
        validate_non_negative(value, f"{prefix}eps[{i}]")
    if not hparams["clip_threshold"] > 0.0:
        raise ValueError(f"invalid {prefix}clip_threshold: {hparams['clip_threshold']!r} (must be > 0)")
    if not hparams["decay_rate"] < 0.0:
        raise ValueError(f"invalid {prefix}decay_rate: {hparams['decay_rate']!r} "
                         "(must be < 0; beta2_t = 1 - t^decay_rate)")
    if hparams["beta1"] is not None:
        validate_unit_interval(hparams["beta1"], f"{prefix}beta1")
    validate_non_negative(hparams["weight_decay"], f"{prefix}weight_decay")


def root_mean_square(tensor: torch.Tensor) -> torch.Tensor:
    """RMS as a 0-d tensor (no host sync)."""
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def step_size(group: dict, step: int, weights: torch.Tensor) -> float | torch.Tensor:
    """The step's learning rate: lr, or min(1e-2, 1/sqrt(t)) (1e-6 t under warmup_init) with relative_step,
    times max(eps[1], RMS(weights)) with scale_parameter (then a 0-d tensor, so no host sync)."""
    size = group["lr"]
    if group["relative_step"]:
        ceiling = 1e-6 * step if group["warmup_init"] else 1e-2
        size = min(ceiling, 1.0 / math.sqrt(step))
    if group["scale_parameter"]:
        return root_mean_square(weights).clamp(min=group["eps"][1]) * size
    return size


def factored_inverse_sqrt(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(V) for the rank-1 estimate V_ij = row_i col_j / mean(row) of the second moment."""
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return row_factor * col.unsqueeze(-2).rsqrt()


def adafactor_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One Adafactor step of one param in place (math in fp32 for half-precision params)."""
    compute_dtype = torch.float32 if param.dtype in _HALF_DTYPES else param.dtype
    grad = grad.to(compute_dtype)
    weights = param.to(compute_dtype)  # param itself unless it is half precision
    state["step"] += 1
    step = state["step"]
    lr = step_size(group, step, weights)
    beta2 = 1.0 - step ** group["decay_rate"]

    squared = grad.square().add_(group["eps"][0])
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1.0 - beta2)
        col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1.0 - beta2)
        update = factored_inverse_sqrt(row, col).mul_(grad)
    else:
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).add_(squared, alpha=1.0 - beta2)
        update = exp_avg_sq.rsqrt().mul_(grad)
    update.div_((root_mean_square(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)

    if group["beta1"] is not None:
        update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
    if group["weight_decay"] != 0 and torch.is_tensor(lr):
        weights.addcmul_(weights, -group["weight_decay"] * lr)  # as add_(alpha=...) would, without a host sync
    elif group["weight_decay"] != 0:
        weights.add_(weights, alpha=-group["weight_decay"] * lr)
    weights.sub_(update)
    if weights is not param:
        param.copy_(weights)


def initial_state(param: torch.Tensor, use_first_moment: bool) -> dict:
    """Zero moments in the compute dtype: row/col statistics over the last two dims for >= 2-D params."""
    options = {"dtype": torch.float32 if param.dtype in _HALF_DTYPES else param.dtype, "device": param.device}
    state: dict[str, Any] = {"step": 0}
    if use_first_moment:
        state["exp_avg"] = torch.zeros(param.shape, **options)
    if param.dim() >= 2:
        state["exp_avg_sq_row"] = torch.zeros(param.shape[:-1], **options)
        state["exp_avg_sq_col"] = torch.zeros(param.shape[:-2] + param.shape[-1:], **options)
    else:
        state["exp_avg_sq"] = torch.zeros(param.shape, **options)
    return state


class Adafactor(torch.optim.Optimizer):
    """Adafactor, from "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (Shazeer & Stern, 2018),
    with the semantics of `transformers.optimization.Adafactor`, the class the StableSPAM baselines used.

    The second moment of a >= 2-D param is kept as row and column means over its last two dims; its decay is
    beta2_t = 1 - t^decay_rate. The update g / sqrt(V) is scaled down to RMS <= clip_threshold, times the step
    size, then optionally averaged with beta1. Weight decay p <- p - weight_decay * lr_t * p comes before the
    update. Half-precision params are updated in fp32 with fp32 state. `step()` never writes `p.grad` and never
    syncs with the host; it loops over params one by one (the factored statistics differ in shape per param).

    The defaults are transformers': no lr, a relative step size and parameter scaling. The StableSPAM baselines
    ran `lr=..., relative_step=False, scale_parameter=False, warmup_init=False` instead.

    Args:
        params: parameters or param groups.
        lr: learning rate; None with relative_step=True (and required with relative_step=False).
        eps: (added to g^2, floor of the param RMS under scale_parameter).
        clip_threshold: the largest RMS of an unscaled update.
        decay_rate: exponent of the second-moment decay, < 0.
        beta1: decay of the first moment; None keeps none (saves memory).
        weight_decay: decoupled weight decay, scaled by the step's learning rate.
        scale_parameter: multiply the step size by max(eps[1], RMS(param)).
        relative_step: step size min(1e-2, 1/sqrt(t)) instead of lr.
        warmup_init: with relative_step, step size min(1e-6 t, 1/sqrt(t)).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ):
        defaults = {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "beta1": beta1, "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                    "relative_step": relative_step, "warmup_init": warmup_init}
        validate_adafactor_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's own hyper-parameters, then add it."""
        validate_adafactor_hyperparameters({**self.defaults, **param_group},
                                           f"param group {len(self.param_groups)} ")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping the fp32 state of half-precision params in fp32 (torch would cast it to the param's
        dtype, and a resumed run would then differ from an uninterrupted one)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.to(device=param.device, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every param with a gradient; returns the closure's loss (None without a closure)."""
        loss = evaluate_closure(closure)
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                reject_complex_param("Adafactor", param, param_index, group_index)
                reject_sparse_grad("Adafactor", param.grad, param_index, group_index)
                if not self.state[param]:
                    self.state[param] = initial_state(param, use_first_moment=group["beta1"] is not None)
                adafactor_update(param, param.grad, self.state[param], group)
        return loss
