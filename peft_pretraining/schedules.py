"""Learning-rate schedules as LambdaLR multipliers on `--lr`.

LambdaLR evaluates the factor at the scheduler's step count before each update, so update k runs with
`factor(k - 1)`: update 1 has factor(0) = 0 under warm-up, as in the reference (docs/algorithms.md#d3).
"""

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

# The reference's value at a cosine cycle restart (t = N): effectively zero, but not exactly zero.
RESTART_FACTOR = 1e-7


def _cosine_decay(progress: float, min_lr_ratio: float) -> float:
    """1 at progress 0, min_lr_ratio at progress 1."""
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_factor(step: int, *, warmup_steps: int, num_training_steps: int, min_lr_ratio: float) -> float:
    """The reference cosine: t/W during warm-up, then cosine from 1 to min_lr_ratio at t = N.

    Like the reference it is periodic with period N; a restart step (t = N, 2N, ...) gives 1e-7. A run of
    exactly N updates uses t = 0 .. N-1 and never reaches it (the reference's extra update N+1 did).
    """
    cycle_step = step % num_training_steps
    if step > 0 and cycle_step == 0:
        return RESTART_FACTOR
    if cycle_step < warmup_steps:
        return cycle_step / warmup_steps
    progress = (cycle_step - warmup_steps) / max(1, num_training_steps - warmup_steps)
    return _cosine_decay(progress, min_lr_ratio)


def linear_factor(step: int, *, warmup_steps: int, num_training_steps: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at t = N (and 0 after)."""
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (num_training_steps - step) / max(1, num_training_steps - warmup_steps))


def cosine_restarts_factor(step: int, *, warmup_steps: int, cycle_length: int, restart_warmup_steps: int,
                           min_lr_ratio: float) -> float:
    """Cosine cycles of `cycle_length` updates, each from 1 down to min_lr_ratio after a linear warm-up
    (`warmup_steps` in the first cycle, `restart_warmup_steps` in the later ones)."""
    cycle, cycle_step = divmod(step, cycle_length)
    warmup = warmup_steps if cycle == 0 else restart_warmup_steps
    if cycle_step < warmup:
        return cycle_step / warmup
    return _cosine_decay((cycle_step - warmup) / max(1, cycle_length - warmup), min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, num_training_steps: int, warmup_steps: int,
                    min_lr_ratio: float, cycle_length: int | None = None,
                    restart_warmup_steps: int | None = None) -> LambdaLR:
    """LambdaLR for `--scheduler` (cosine, linear or cosine_restarts)."""
    if kind == "cosine":
        factor = partial(cosine_factor, warmup_steps=warmup_steps, num_training_steps=num_training_steps,
                         min_lr_ratio=min_lr_ratio)
    elif kind == "linear":
        factor = partial(linear_factor, warmup_steps=warmup_steps, num_training_steps=num_training_steps)
    elif kind == "cosine_restarts":
        if cycle_length is None:
            raise ValueError("--scheduler cosine_restarts needs --cycle_length N (updates per cosine cycle)")
        factor = partial(cosine_restarts_factor, warmup_steps=warmup_steps, cycle_length=cycle_length,
                         restart_warmup_steps=warmup_steps if restart_warmup_steps is None else restart_warmup_steps,
                         min_lr_ratio=min_lr_ratio)
    else:
        raise ValueError(f"--scheduler {kind!r}: unknown; choose cosine, linear or cosine_restarts")
    return LambdaLR(optimizer, factor)
