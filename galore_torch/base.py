"""What the optimizers share: argument validators (each raises ValueError naming the argument), closure
evaluation, and the pickling of settings that are not hyper-parameters."""

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


def validate_variant(value: str, name: str = "variant") -> None:
    if value not in ("reference", "corrected"):
        raise ValueError(f"invalid {name}: {value!r} (choose 'reference' or 'corrected')")


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


class ConfiguredOptimizer(torch.optim.Optimizer):
    """An optimizer with settings that say how it computes rather than what (`compile`, `fp32_state`, ...).

    They stay out of the param groups and `state_dict()`, but pickle and deepcopy must carry them: torch's
    `__getstate__` keeps only defaults, state and param groups. Subclasses apply them in `_configure`.
    """

    settings: dict[str, Any]

    def _configure(self, settings: dict[str, Any]) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling restores the settings. `load_state_dict` lands here too, with state and param groups
        only: a group saved before a hyper-parameter became a group key gets the constructor's value."""
        state = dict(state)
        settings = state.pop("settings", None)
        # the constructor's values (unpickling brings them along), read before torch's __setstate__ adds its
        # own flags to the defaults
        defaults = state["defaults"] if "defaults" in state else self.defaults
        for group in state["param_groups"]:
            for key, value in defaults.items():
                group.setdefault(key, value)
        super().__setstate__(state)
        if settings is not None:
            self._configure(settings)


def check_variants_match(optimizer_name: str, groups: list[dict], saved_variants: list[str | None]) -> None:
    """Refuse to load a state saved by the other variant (None: not known) into a param group: its counters and
    moments mean something else there."""
    for index, (group, saved_variant) in enumerate(zip(groups, saved_variants)):
        if saved_variant is not None and saved_variant != group["variant"]:
            raise ValueError(f"invalid state_dict: param group {index} was saved by {optimizer_name} with "
                             f"variant={saved_variant!r}, this one has variant={group['variant']!r}; construct "
                             f"it with variant={saved_variant!r} to resume")
