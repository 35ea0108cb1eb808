"""The one optimizer table of the tests: which optimizers the generic tests run, and the constructor
arguments that make a few steps exercise each one's machinery (short warm-ups and reset periods).

A registered optimizer of our own joins every generic test (registry contract, maximize, non-finite skips)
without a row; a row is needed only when its defaults do not suit a few-step run."""

import inspect

import torch

from galore_torch import OPTIMIZERS, get_optimizer_class
from galore_torch.galore import GaLore
from galore_torch.per_layer import PerLayerOptimizer

# Our own optimizers (galore_torch's classes, not torch's), in registry order.
OUR_OPTIMIZERS = tuple(name for name, cls in OPTIMIZERS.items() if cls.__module__.startswith("galore_torch."))
# Per-layer optimizers step each parameter inside backward (docs/galore.md): their step() does nothing, so a
# bad gradient is refused during backward, and a non-finite update cannot be skipped.
PER_LAYER = tuple(name for name in OUR_OPTIMIZERS if issubclass(OPTIMIZERS[name], PerLayerOptimizer))
# Optimizers that refuse pickling and deepcopy by design (GaLore's, per-layer ones): save their state_dict().
NOT_COPYABLE = tuple(name for name in OUR_OPTIMIZERS if issubclass(OPTIMIZERS[name], (GaLore, PerLayerOptimizer)))

FEW_STEP_ARGUMENTS: dict[str, dict] = {
    "adamw": {"lr": 1e-2},
    "adafactor": {"lr": 1e-2, "relative_step": False},
    "lion": {"lr": 1e-2},
    "spam": {"lr": 1e-2, "warmup_epoch": 2, "grad_accu_steps": 2},
    "stablespam": {"lr": 1e-2, "gamma1": 0.7, "gamma2": 0.9, "update_proj_gap": 4, "total_T": 8},
}
COMPILED_SUFFIX = "-compiled"


def takes(name: str, argument: str) -> bool:
    """Whether the optimizer registered as `name` has the constructor argument `argument`."""
    return argument in inspect.signature(get_optimizer_class(name)).parameters


def with_compiled(names: tuple[str, ...]) -> list[str]:
    """The names plus `<name>-compiled` for each whose step has a compiled core (`compile=True`)."""
    return [*names, *(f"{name}{COMPILED_SUFFIX}" for name in names if takes(name, "compile"))]


def make_optimizer(case: str, params, **overrides) -> torch.optim.Optimizer:
    """The optimizer of a table case (`name` or `name-compiled`) with its few-step arguments and `overrides`."""
    name = case.removesuffix(COMPILED_SUFFIX)
    compiled = {"compile": True} if case != name else {}
    return get_optimizer_class(name)(params, **{**FEW_STEP_ARGUMENTS.get(name, {}), **compiled, **overrides})
