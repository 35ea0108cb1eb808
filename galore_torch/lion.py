"""Lion: the sign of an interpolated momentum as the update, a baseline for the Adam-family optimizers."""

from collections.abc import Callable, Iterable
from typing import Any

import torch

from galore_torch.base import (
    evaluate_closure,
    reject_complex_param,
    reject_sparse_grad,
    validate_betas,
    validate_group_hyperparameters,
    validate_non_negative,
)


def lion_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], *,
                lr: float, beta1: float, beta2: float, weight_decay: float, maximize: bool = False) -> None:
    """One Lion step in place on same-device, same-dtype lists: c = beta1 m + (1 - beta1) g,
    p <- p (1 - lr wd) - lr sign(c), m <- beta2 m + (1 - beta2) g; with `maximize`, g is -grad."""
    if maximize:
        grads = torch._foreach_neg(grads)
    updates = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(updates, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(updates)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)


class Lion(torch.optim.Optimizer):
    """Lion, from "Symbolic Discovery of Optimization Algorithms" (Chen et al., 2023).

    Every entry moves by exactly lr per step, in the direction of sign(beta1 m + (1 - beta1) g); the momentum
    m then decays with beta2. One moment per param (half of Adam's state). Weight decay is decoupled.
    Params are updated as lists grouped by device and dtype; `step()` never writes `p.grad`.

    Args:
        params: parameters or param groups.
        lr: learning rate (typically 3-10x smaller than AdamW's).
        betas: (beta1, beta2): interpolation weight of the update direction, decay rate of the momentum.
        weight_decay: decoupled weight decay p <- p * (1 - lr * weight_decay).
        maximize: step along the gradient instead of against it, as torch.optim's `maximize`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
    ):
        validate_non_negative(lr, "lr")
        validate_betas(betas)
        validate_non_negative(weight_decay, "weight_decay")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize})

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling and `load_state_dict` land here: a group saved before `maximize` existed minimizes."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's own lr, betas and weight_decay, then add it."""
        validate_group_hyperparameters({**self.defaults, **param_group}, len(self.param_groups))
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every param with a gradient; returns the closure's loss (None without a closure)."""
        loss = evaluate_closure(closure)
        for group_index, group in enumerate(self.param_groups):
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
            for param_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                reject_complex_param("Lion", p, param_index, group_index)
                reject_sparse_grad("Lion", p.grad, param_index, group_index)
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params, grads, exp_avgs = buckets.setdefault((p.device, p.dtype), ([], [], []))
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            beta1, beta2 = group["betas"]
            for params, grads, exp_avgs in buckets.values():
                lion_update(params, grads, exp_avgs, lr=group["lr"], beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"], maximize=group["maximize"])
        return loss
