"""The GaLore optimizers: `GaLore` around AdamW, Adafactor, 8-bit AdamW, StableSPAM and SPAM.

Each takes param groups as `GaLore` does (groups with `rank` are projected; see galore_torch.galore) and
`variant` ("reference" or "corrected": what happens to the moments when the subspace changes).
"""

from collections.abc import Iterable
from typing import Any

import torch

from galore_torch.adafactor import Adafactor
from galore_torch.galore import GaLore
from galore_torch.hf_adamw import HFAdamW
from galore_torch.spam import SPAM
from galore_torch.stable_spam import StableSPAM

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class GaLoreAdamW(GaLore):
    """GaLore's AdamW: transformers-style AdamW (`HFAdamW`: eps outside the square root, bias correction in
    the step size, weight decay after the update) on the projected gradient; plain groups get the same AdamW."""

    inner_keys = {"betas": "betas", "eps": "eps", "correct_bias": "correct_bias"}

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, variant: str = "reference"):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias}, variant)

    def _make_inner(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return HFAdamW(groups)


class GaLoreAdafactor(GaLore):
    """GaLore's Adafactor: our transformers-semantics `Adafactor` on the projected gradient, weight decay
    before the update (as transformers'). Only an explicit lr: relative steps and parameter scaling would
    take the RMS of the zero subspace param, not of the weight, so they are not offered."""

    decay_before_update = True
    inner_keys = {"eps": "eps", "clip_threshold": "clip_threshold", "decay_rate": "decay_rate", "beta1": "beta1"}

    def __init__(self, params: Params, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, variant: str = "reference"):
        super().__init__(params, {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                                  "beta1": beta1, "weight_decay": weight_decay}, variant)

    def _make_inner(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return Adafactor(groups, lr=self.defaults["lr"], relative_step=False, scale_parameter=False,
                         warmup_init=False)


class GaLoreAdamW8bit(GaLore):
    """GaLore's 8-bit AdamW: `galore_torch.blockwise8bit.AdamW8bit` (blockwise 8-bit moments, torch AdamW
    arithmetic) on the projected gradient; decay of projected params after the update, as the reference.
    variant="corrected" is not offered: 8-bit moments cannot be rotated into a new subspace."""

    supports_corrected = False
    inner_keys = {"betas": "betas", "eps": "eps"}

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, variant: str = "reference"):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, variant)

    def _make_inner(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        from galore_torch.blockwise8bit import AdamW8bit  # written separately; imported only when used

        return AdamW8bit(groups)


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    """Q-GaLore (simulated): `GaLoreAdamW8bit` whose projected groups default to `quant=True` (INT8 factors,
    lazy subspace updates). The reference's INT8 weights with stochastic rounding are not simulated."""

    group_defaults = {"quant": True}


class GaLoreStableSPAM(GaLore):
    """StableSPAM in GaLore's subspace: AdaClip, AdaGN and Adam on the projected gradient, the momentum reset
    every `momentum_reset_gap` steps. Two periods: the group's `update_proj_gap` recomputes the projection,
    `momentum_reset_gap` resets the moments (the reference used one flag for both). `variant` also selects
    StableSPAM's own variant. Weight decay before the update, as StableSPAM."""

    decay_before_update = True
    inner_keys = {"betas": "betas", "eps": "eps", "amsgrad": "amsgrad", "gamma1": "gamma1", "gamma2": "gamma2",
                  "gamma3": "gamma3", "total_T": "total_T", "eta_min": "eta_min",
                  "momentum_reset_gap": "update_proj_gap", "variant": "variant"}

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, gamma1: float = 0.7,
                 gamma2: float = 0.9, gamma3: float = 0.999, total_T: int | None = None, eta_min: float = 0.5,
                 momentum_reset_gap: int = 1000, variant: str = "reference"):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "amsgrad": amsgrad, "gamma1": gamma1, "gamma2": gamma2, "gamma3": gamma3,
                                  "total_T": total_T, "eta_min": eta_min, "momentum_reset_gap": momentum_reset_gap},
                         variant)

    def _make_inner(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return StableSPAM(groups)


class GaLoreSPAM(GaLore):
    """SPAM in GaLore's subspace: spike clipping and Adam on the projected gradient; each projected group is
    SPAM's sparse-momentum group (`density` of the subspace entries keep moments) with its momentum reset
    every `momentum_reset_gap` steps, distinct from the projection period `update_proj_gap`. `variant` also
    selects SPAM's own variant. Weight decay after the update, as SPAM."""

    inner_keys = {"betas": "betas", "eps": "eps", "correct_bias": "correct_bias", "threshold": "threshold",
                  "grad_accu_steps": "grad_accu_steps", "variant": "variant"}

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, warmup_epoch: int = 150,
                 threshold: float = 2000, grad_accu_steps: int = 20, density: float = 1.0,
                 momentum_reset_gap: int = 500, variant: str = "reference"):
        self._spam_settings = {"warmup_epoch": warmup_epoch, "density": density,
                               "momentum_reset_gap": momentum_reset_gap}
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias, "threshold": threshold,
                                  "grad_accu_steps": grad_accu_steps}, variant)

    def _projected_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {**settings, "density": self._spam_settings["density"],
                "update_proj_gap": self._spam_settings["momentum_reset_gap"]}

    def _make_inner(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return SPAM(groups, warmup_epoch=self._spam_settings["warmup_epoch"])
