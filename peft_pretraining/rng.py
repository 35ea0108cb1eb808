"""Capture and restore every random number generator a training step draws from, so a resumed run makes the
same random choices as the uninterrupted one (SPAM's momentum masks, stochastic rounding, dropout).

Covered: python `random`, numpy's global RNG, torch's CPU RNG, every CUDA device's RNG, and any
`torch.Generator` a module holds as `.generator` (QuantLinear's stochastic-rounding source). The state is plain
tensors, ints and lists, so it loads with `torch.load(weights_only=True)`.
"""

import random

import numpy as np
import torch
from torch import nn


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The generators held by modules (keyed by module name); None means the module uses the global RNG."""
    return {name: module.generator for name, module in model.named_modules()
            if isinstance(getattr(module, "generator", None), torch.Generator)}


def capture_rng_state(model: nn.Module) -> dict:
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "modules": {name: generator.get_state() for name, generator in module_generators(model).items()},
    }


def check_rng_state(model: nn.Module, state: dict, *, source: str) -> None:
    """Raise ValueError (one line naming `source`) unless the saved generators fit this process and model."""
    if torch.cuda.is_available() and state["cuda"] and len(state["cuda"]) != torch.cuda.device_count():
        raise ValueError(f"{source}: saved RNG states for {len(state['cuda'])} CUDA devices, this process sees "
                         f"{torch.cuda.device_count()}; resume with the same devices visible")
    generators = module_generators(model)
    if set(generators) != set(state["modules"]):
        raise ValueError(f"{source}: saved stochastic-rounding generators for {sorted(state['modules'])}, this model "
                         f"has {sorted(generators)}; resume with the same quantization flags")


def restore_rng_state(model: nn.Module, state: dict, *, source: str) -> None:
    """Put every generator back; call it last, after anything during setup that may draw random numbers.
    `source` (the file it came from) names the mismatch when the state does not fit this run."""
    check_rng_state(model, state, source=source)
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    saved_numpy = state["numpy"]
    np.random.set_state((saved_numpy["kind"], saved_numpy["keys"].numpy().astype(np.uint32),
                         saved_numpy["position"], saved_numpy["has_gauss"], saved_numpy["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in module_generators(model).items():
        generator.set_state(state["modules"][name])
