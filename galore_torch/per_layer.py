"""Per-layer updates: each parameter is stepped by its own optimizer as soon as its gradient is complete,
from `register_post_accumulate_grad_hook` during backward, and its gradient freed at once, so the gradients
of the whole model never exist together (GaLore's 7B-on-24GB recipe).

`PerLayerOptimizer` gathers those optimizers behind the torch.optim interface so that a training loop, an
LR scheduler and checkpointing need no change: `step()` does nothing (the hooks have stepped), and
`param_groups` are the per-param optimizers' own groups (one per param), so a single `LambdaLR` over it
sets every param's lr. The reference stepped one scheduler per param right after that param's update; both
give update k the factor of step k - 1, so the trajectories are the same.

Limits, as the reference: every backward steps, so gradient accumulation (several backwards per update) and
data parallelism (the hook fires before gradients are all-reduced) are wrong here and must be refused by the
caller; nothing can clip the global gradient norm or skip a non-finite update, since each param has already
been updated by the time backward ends.
"""

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from galore_torch.base import evaluate_closure
from galore_torch.galore_optimizers import GaLoreAdamW8bit, QGaLoreAdamW8bit


class PerLayerOptimizer(torch.optim.Optimizer):
    """One `optimizer_class` per param (with that param's group settings and `kwargs`), stepped by hooks.

    `remove_hooks()` detaches the hooks (e.g. before building another optimizer over the same model).
    """

    optimizer_class: type[torch.optim.Optimizer] | None = None

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 optimizer_class: type[torch.optim.Optimizer] | None = None, **kwargs: Any):
        optimizer_class = optimizer_class or self.optimizer_class
        if optimizer_class is None:
            raise ValueError("PerLayerOptimizer needs optimizer_class: the optimizer each param gets")
        super().__init__(params, {})
        self._optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for group in self.param_groups:
            settings = {key: value for key, value in group.items() if key != "params"}
            for p in group["params"]:
                self._optimizers[p] = optimizer_class([{"params": [p], **settings}], **kwargs)
        self._use_inner_groups()
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_param) for p in self._optimizers]

    def __getstate__(self) -> dict[str, Any]:
        """Refused: torch pickles only state and param groups, which would silently drop what this optimizer
        needs beyond them; checkpoint it with state_dict()."""
        raise TypeError(f"{type(self).__name__} cannot be pickled or deep-copied; save its state_dict() instead")

    def _step_param(self, p: torch.Tensor) -> None:
        optimizer = self._optimizers[p]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _use_inner_groups(self) -> None:
        self.param_groups = [optimizer.param_groups[0] for optimizer in self._optimizers.values()]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Nothing to do: each param was stepped by its hook during backward. Returns the closure's loss."""
        return evaluate_closure(closure)

    def state_dict(self) -> dict[str, Any]:
        """torch's format over all params (one param group per param)."""
        self.state = defaultdict(dict, {p: optimizer.state[p] for p, optimizer in self._optimizers.items()
                                        if p in optimizer.state})
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hand each per-param optimizer its group and state."""
        if len(state_dict["param_groups"]) != len(self._optimizers):
            raise ValueError(f"invalid state_dict: {len(state_dict['param_groups'])} param groups, this per-layer "
                             f"optimizer has one per param ({len(self._optimizers)})")
        for group, optimizer in zip(state_dict["param_groups"], self._optimizers.values()):
            (saved_id,) = group["params"]
            saved = state_dict["state"].get(saved_id)
            optimizer.load_state_dict({"state": {} if saved is None else {0: saved},
                                       "param_groups": [{**group, "params": [0]}]})
        self._use_inner_groups()


class GaLoreAdamW8bitPerLayer(PerLayerOptimizer):
    """`GaLoreAdamW8bit` per layer (the reference's galore_adamw8bit_per_layer)."""

    optimizer_class = GaLoreAdamW8bit


class QGaLoreAdamW8bitPerLayer(PerLayerOptimizer):
    """`QGaLoreAdamW8bit` per layer (the reference's q_galore_adamw8bit_per_layer)."""

    optimizer_class = QGaLoreAdamW8bit
