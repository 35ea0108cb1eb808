"""What the optimizers share: argument validators (each raises ValueError naming the argument) and closure
evaluation."""

from collections.abc import Callable, Sequence
from typing import Any

import torch


def validate_non_negative(value: float, name: str) -> None:
    if not value >= 0.0:
        raise ValueError(f"invalid {name}: {value!r} (must be >= 0)")


def validate_unit_interval(value: float, name: str) -> None:
    """Decay rates: 0 <= value < 1."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must be in [0, 1))")


def validate_betas(betas: Sequence[float], name: str = "betas") -> None:
    if len(betas) != 2:
        raise ValueError(f"invalid {name}: {betas!r} (expected two values)")
    for i, beta in enumerate(betas):
        validate_unit_interval(beta, f"{name}[{i}]")


def validate_density(value: float, name: str = "density") -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must be in (0, 1])")


def validate_variant(value: str) -> None:
    if value not in ("reference", "corrected"):
        raise ValueError(f"invalid variant: {value!r} (choose 'reference' or 'corrected')")


def validate_non_negative_int(value: int, name: str) -> None:
    """Step counts and periods: a plain int >= 0 (bool is rejected, it is a silent 0/1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid {name}: {value!r} (must be an int >= 0)")


def validate_positive_int(value: int, name: str) -> None:
    """Lengths of schedules: a plain int >= 1 (bool is rejected, it is a silent 0/1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {name}: {value!r} (must be an int >= 1)")


def validate_closed_unit_interval(value: float, name: str) -> None:
    """Fractions that may reach both ends: 0 <= value <= 1."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"invalid {name}: {value!r} (must be in [0, 1])")


def reject_sparse_grad(optimizer_name: str, grad, param_index: int, group_index: int) -> None:
    """These optimizers need dense gradients (per-tensor norms, masks, where); say which param has a sparse one."""
    if grad.is_sparse:
        raise ValueError(f"{optimizer_name} does not support sparse gradients (param {param_index} of param "
                         f"group {group_index}); use dense ones, e.g. nn.Embedding(sparse=False)")


def reject_complex_param(optimizer_name: str, param: torch.Tensor, param_index: int, group_index: int) -> None:
    """Per-tensor maxima, norms and signs have no complex meaning: a complex param would be updated wrongly or
    fail inside torch, so say which param it is and how to train it as real numbers."""
    if param.is_complex():
        raise ValueError(f"{optimizer_name} does not support complex parameters (param {param_index} of param "
                         f"group {group_index} has dtype {param.dtype}); train a real view of it, "
                         "torch.view_as_real(param), instead")


def validate_group_hyperparameters(group: dict, index: int) -> None:
    """lr, betas, eps and weight_decay of one param group (those it has, defaults merged in), named by group."""
    checks = {"lr": validate_non_negative, "betas": validate_betas, "eps": validate_non_negative,
              "weight_decay": validate_non_negative}
    for key, check in checks.items():
        if key in group:
            check(group[key], f"param group {index} {key}")


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss (None without one), computed with grad enabled: `step()` itself runs under no_grad."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
