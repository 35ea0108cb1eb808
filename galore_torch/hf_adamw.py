"""AdamW as transformers wrote it (and GaLore's reference built on): eps added to sqrt(v) before the bias
correction, the correction folded into the step size, weight decay after the update."""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from galore_torch.base import (
    evaluate_closure,
    reject_complex_param,
    reject_sparse_grad,
    validate_betas,
    validate_non_negative,
)


class HFAdamW(torch.optim.Optimizer):
    """transformers' AdamW: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps) (without the
    sqrt/denominator factor when `correct_bias=False`), then p -= lr * weight_decay * p. Per param, no host
    syncs."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        validate_non_negative(lr, "lr")
        validate_betas(betas)
        validate_non_negative(eps, "eps")
        validate_non_negative(weight_decay, "weight_decay")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        for group_index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for param_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                reject_complex_param("AdamW", p, param_index, group_index)
                reject_sparse_grad("AdamW", p.grad, param_index, group_index)
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
