"""GaLore: an optimizer's update computed in a rank-r subspace of each matrix's gradient.

`GaLore` wraps an inner optimizer. For a param group with `rank`, each param's gradient G is projected
(`GaLoreProjector`) and handed to the inner optimizer as the gradient of a zero "subspace param" of the
rank-r shape; whatever the inner step moves that zero tensor to is the rank-r update, which is projected
back (times `scale`) onto the param. This is what the reference's 8-bit GaLore does with `p.data`, applied
to every inner optimizer, so AdamW, Adafactor, 8-bit AdamW, StableSPAM and SPAM all run on the projected
gradient with their own state in the subspace. Groups without `rank` are the inner optimizer's plain groups.

Weight decay of a projected param is applied by the wrapper to the full weight (`p -= lr * wd * p`, before or
after the update as the inner optimizer orders it); the inner one sees weight_decay = 0 there.

All state lives in `self.state[p]` (flat: the projector's `proj_*` keys and the inner optimizer's under
`inner_*`) and the inner optimizer's group counters in the param groups under `inner_*`, so `state_dict()`
is torch's, FQN-mappable by torch.distributed.checkpoint, and loads with `torch.load(weights_only=True)`.

variant="reference": moments live in the subspace, created at the first step and kept as they are when
the subspace changes (the original). variant="corrected": at a recomputation, moments are carried into
the new subspace: first moments m <- R_l m R_r^T, second moments v <- (R_l o R_l) v (R_r o R_r)^T (o: the
entrywise square; the second moment of uncorrelated coordinates under the rotation), with R_l = U_new^T U_old
and R_r = Vh_new Vh_old^T; Adafactor's row/column statistics take the factor of their side. Moments that are
not float tensors of known meaning (8-bit codes) cannot be carried: those optimizers refuse "corrected".

The subspace params hold memory only during `step()` (each is emptied after its update is applied, as the
reference's 8-bit GaLore restored `p.data`). `step()` syncs with the
device only inside the SVD (and Q-GaLore's gap decision at a recomputation).
"""

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from galore_torch.base import evaluate_closure, validate_non_negative, validate_variant
from galore_torch.galore_projector import GaLoreProjector
from galore_torch.sharded import shard_group

INNER = "inner_"
# What a param group with `rank` may set, and the values it gets otherwise.
GALORE_DEFAULTS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "quant": False, "quant_n_bit": 8,
                   "quant_group_size": 256, "cos_threshold": 0.4, "gamma_proj": 2.0, "queue_size": 5}
_FIRST_MOMENTS = ("exp_avg",)
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


class GaLore(torch.optim.Optimizer):
    """Base of the GaLore optimizers (see the module docstring); subclasses choose the inner optimizer.

    Args:
        params: param groups; those with `rank` are projected, with `update_proj_gap`, `scale`,
            `proj_type` (std, reverse_std, right, left, full) and Q-GaLore's `quant`, `quant_n_bit`,
            `quant_group_size`, `cos_threshold`, `gamma_proj`, `queue_size` (defaults: GALORE_DEFAULTS).
        defaults: the hyper-parameters (lr, weight_decay and the inner optimizer's group keys).
        variant: "reference" or "corrected" (see the module docstring).
    """

    decay_before_update = False  # the inner optimizer's order of decay and update
    supports_corrected = True  # its moments are float tensors that can be carried to a new subspace
    inner_keys: dict[str, str] = {}  # outer group key -> inner group key (beyond lr and weight_decay)
    group_defaults: dict[str, Any] = {}  # overrides of GALORE_DEFAULTS for this class

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any],
                 variant: str = "reference"):
        validate_variant(variant)
        if variant == "corrected" and not self.supports_corrected:
            raise ValueError(f"invalid variant: 'corrected' is not available for {type(self).__name__} (its "
                             "moments cannot be carried to a new subspace); use variant='reference'")
        super().__init__(params, {**defaults, "variant": variant})
        self._projectors: dict[torch.Tensor, GaLoreProjector] = {}
        self._shadows: dict[torch.Tensor, torch.Tensor] = {}
        inner_groups = [self._inner_group(group) for group in self.param_groups]
        self.inner = self._make_inner(inner_groups)  # some inner optimizers size state at construction
        for shadow in self._shadows.values():
            shadow.data = shadow.new_empty(0)
        self._pull_from_inner()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group; a projected one gets the GaLore defaults it lacks, and every param a projector (which
        refuses bad settings, e.g. rank >= min(m, n), with the param's shape)."""
        if hasattr(self, "inner"):
            raise ValueError(f"{type(self).__name__} takes its param groups at construction only")
        index = len(self.param_groups)
        merged = {**self.defaults, **param_group}
        validate_non_negative(merged["lr"], f"param group {index} lr")
        validate_non_negative(merged["weight_decay"], f"param group {index} weight_decay")
        if "rank" in param_group:
            for key, value in {**GALORE_DEFAULTS, **self.group_defaults}.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        """Refused: torch pickles only state and param groups, which would silently drop what this optimizer
        needs beyond them; checkpoint it with state_dict()."""
        raise TypeError(f"{type(self).__name__} cannot be pickled or deep-copied; save its state_dict() instead")

    def _make_inner(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _inner_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The inner optimizer's group for `group`: shadow params (projected groups) or the params themselves."""
        settings = {inner: group[outer] for outer, inner in self.inner_keys.items()}
        if "rank" not in group:
            return {"params": group["params"], "lr": group["lr"], "weight_decay": group["weight_decay"], **settings}
        shadows = []
        for p in group["params"]:
            if shard_group(p) is not None:
                raise ValueError(f"{type(self).__name__} needs whole matrices for the SVD; a param of shape "
                                 f"{tuple(p.shape)} is sharded (FSDP2): train GaLore with DDP or one process")
            projector = GaLoreProjector(
                p.shape, group["rank"], proj_type=group["proj_type"], scale=group["scale"],
                update_proj_gap=group["update_proj_gap"], quant=group["quant"], quant_n_bit=group["quant_n_bit"],
                quant_group_size=group["quant_group_size"], cos_threshold=group["cos_threshold"],
                gamma_proj=group["gamma_proj"], queue_size=group["queue_size"], variant=group["variant"])
            self._projectors[p] = projector
            self._shadows[p] = torch.zeros(projector.low_shape, dtype=p.dtype, device=p.device)
            shadows.append(self._shadows[p])
        return {"params": shadows, "lr": group["lr"], "weight_decay": 0.0, **self._projected_settings(settings)}

    def _projected_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Inner group settings of a projected group (subclasses add keys, e.g. SPAM's density)."""
        return settings

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Project, step the inner optimizer, project back; returns the closure's loss."""
        loss = evaluate_closure(closure)
        self._push_hyperparameters()
        projected = []
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for p in group["params"]:
                shadow = self._shadows[p]
                # full size during the step even without a gradient: SPAM redraws every mask from its param's shape
                shadow.data = torch.zeros(self._projectors[p].low_shape, dtype=shadow.dtype, device=shadow.device)
                if p.grad is None:
                    continue
                low, rotations = self._projectors[p].project(p.grad, self.state[p])
                if rotations is not None:
                    self._carry_moments(shadow, rotations)
                shadow.grad = low.to(shadow.dtype)
                projected.append((p, group))
        self.inner.step()
        for p, group in projected:
            shadow = self._shadows[p]
            decay = -group["lr"] * group["weight_decay"]
            if decay != 0 and self.decay_before_update:
                p.add_(p, alpha=decay)
            p.add_(self._projectors[p].project_back(shadow, self.state[p]).to(p.dtype))
            if decay != 0 and not self.decay_before_update:
                p.add_(p, alpha=decay)
        for shadow in self._shadows.values():
            shadow.grad = None
            shadow.data = shadow.new_empty(0)
        self._pull_from_inner()
        return loss

    def _carry_moments(self, shadow: torch.Tensor, rotations) -> None:
        """variant="corrected": rotate the inner moments of `shadow` into the new subspace."""
        state = self.inner.state[shadow]
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or not value.is_floating_point():
                continue
            squared = key not in _FIRST_MOMENTS
            left, right = (None if r is None else (r.square() if squared else r).to(value.dtype) for r in rotations)
            if key in _FIRST_MOMENTS + _SECOND_MOMENTS:
                if left is not None:
                    value = left @ value
                if right is not None:
                    value = value @ right.t()
                if "mask" in state:  # SPAM's sparse momentum: unmasked entries stay 0
                    value = torch.where(state["mask"], value, 0.0)
            elif key == "exp_avg_sq_row" and left is not None:
                value = left @ value
            elif key == "exp_avg_sq_col" and right is not None:
                value = right @ value
            state[key] = value

    def _inner_param(self, p: torch.Tensor) -> torch.Tensor:
        return self._shadows.get(p, p)

    def _push_hyperparameters(self) -> None:
        """Hyper-parameters the caller may change between steps (a scheduler's lr) go to the inner groups."""
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            inner_group["lr"] = group["lr"]
            if "rank" not in group:
                inner_group["weight_decay"] = group["weight_decay"]
            for outer, inner in self.inner_keys.items():
                inner_group[inner] = group[outer]

    def _pull_from_inner(self) -> None:
        """Mirror the inner optimizer's per-param state and group counters under `inner_*` keys."""
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            for key, value in inner_group.items():
                if key != "params" and key not in ("lr", "weight_decay", *self.inner_keys.values()):
                    group[INNER + key] = value
            for p in group["params"]:
                inner_state = self.inner.state.get(self._inner_param(p))
                if inner_state:
                    self.state[p].update({INNER + key: value for key, value in inner_state.items()})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping each state tensor's saved dtype (torch casts them to the param's), and hand the inner
        optimizer its part."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            state = self.state[p]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device=p.device, copy=True)
            self.inner.state[self._inner_param(p)] = {key[len(INNER):]: value for key, value in state.items()
                                                       if key.startswith(INNER)}
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            for key, value in group.items():
                if key.startswith(INNER):
                    inner_group[key[len(INNER):]] = value
        self._push_hyperparameters()
