"""LR schedules pinned to numbers (docs/algorithms.md#d3 for the reference cosine)."""

import math

import pytest
import torch

from peft_pretraining.schedules import build_scheduler, cosine_factor, cosine_restarts_factor, linear_factor

COSINE = dict(warmup_steps=10, num_training_steps=100, min_lr_ratio=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),  # update 1 runs with lr 0, like the reference
    (1, 0.1),
    (5, 0.5),
    (10, 1.0),  # end of warm-up
    (55, 0.55),  # half-way through the cosine: 0.1 + 0.9 * 0.5
    (99, 0.1 + 0.45 * (1 - math.cos(math.pi / 90))),  # the last update of a 100-update run
    (100, 1e-7),  # the reference's cycle restart (its extra update N+1)
    (105, 0.5),  # periodic like the reference
])
def test_reference_cosine(step, expected):
    assert cosine_factor(step, **COSINE) == pytest.approx(expected, abs=1e-12)


def test_cosine_without_warmup_starts_at_peak():
    assert cosine_factor(0, warmup_steps=0, num_training_steps=10, min_lr_ratio=0.1) == 1.0


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0), (120, 0.0)])
def test_linear(step, expected):
    assert linear_factor(step, warmup_steps=10, num_training_steps=100) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (10, 0.5), (20, 1.0), (40, 0.55), (59, 0.1 + 0.45 * (1 - math.cos(math.pi / 40))),
    (60, 0.0),  # restart: warm up again, now over restart_warmup_steps
    (65, 0.5), (70, 1.0), (95, 0.55), (120, 0.0),
])
def test_cosine_restarts(step, expected):
    factor = cosine_restarts_factor(step, warmup_steps=20, cycle_length=60, restart_warmup_steps=10,
                                    min_lr_ratio=0.1)
    assert factor == pytest.approx(expected)


def lrs_used_by_updates(scheduler_kind: str, updates: int, **kwargs) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_scheduler(optimizer, scheduler_kind, **kwargs)
    used = []
    for _ in range(updates):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_update_k_uses_factor_of_k_minus_1():
    used = lrs_used_by_updates("cosine", 100, num_training_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert used[0] == 0.0
    assert used == pytest.approx([2.0 * cosine_factor(k, **COSINE) for k in range(100)])


def test_scheduler_state_round_trips():
    param = torch.nn.Parameter(torch.zeros(1))
    kwargs = dict(num_training_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, "cosine", **kwargs)
    for _ in range(37):
        optimizer.step()
        scheduler.step()
    restored_optimizer = torch.optim.SGD([param], lr=1.0)
    restored = build_scheduler(restored_optimizer, "cosine", **kwargs)
    restored.load_state_dict(scheduler.state_dict())
    restored_optimizer.load_state_dict(optimizer.state_dict())
    assert restored.last_epoch == 37
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(cosine_factor(37, **COSINE))


def test_cosine_restarts_needs_a_cycle_length():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="--cycle_length"):
        build_scheduler(optimizer, "cosine_restarts", num_training_steps=10, warmup_steps=1, min_lr_ratio=0.1)
