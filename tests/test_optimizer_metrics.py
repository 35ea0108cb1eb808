"""The optimizer statistics protocol: `metrics()` returns what the last step measured as 0-dim device tensors,
without reading any tensor on the host; optimizers that measure nothing have no such method."""

import math

import pytest
import torch

from galore_torch.spam import SPAM
from galore_torch.stable_spam import StableSPAM
from host_reads import forbid_host_reads
from peft_pretraining.trainer import optimizer_metrics


def stepped(optimizer_class, **kwargs) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer = optimizer_class(model.parameters(), **kwargs)
    optimizer.step()
    return optimizer


def metrics_without_host_reads(optimizer, monkeypatch) -> dict[str, float]:
    forbid_host_reads(monkeypatch)
    result = optimizer_metrics(optimizer)
    monkeypatch.undo()
    assert all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in result.values())
    return {key: float(value) for key, value in result.items()}


def test_stablespam_metrics_are_the_mean_min_max_of_its_clip_threshold_and_norm_scale(monkeypatch):
    optimizer = stepped(StableSPAM, lr=1e-3)
    thresholds = torch.stack([state["clip_threshold"].float() for state in optimizer.state.values()])
    scales = torch.stack([state["norm_scale"].float() for state in optimizer.state.values()])
    assert len(thresholds) == 4
    assert metrics_without_host_reads(optimizer, monkeypatch) == pytest.approx({
        "stablespam/clip_threshold_mean": float(thresholds.mean()), "stablespam/clip_threshold_min":
        float(thresholds.min()), "stablespam/clip_threshold_max": float(thresholds.max()),
        "stablespam/norm_scale_mean": float(scales.mean()), "stablespam/norm_scale_min": float(scales.min()),
        "stablespam/norm_scale_max": float(scales.max())})


def test_spam_metrics_are_its_own_post_clip_norm(monkeypatch):
    optimizer = stepped(SPAM, lr=1e-3)
    result = metrics_without_host_reads(optimizer, monkeypatch)
    assert result == {"spam/grad_norm_afterclip": pytest.approx(float(optimizer.last_grad_norm))}
    assert math.isfinite(result["spam/grad_norm_afterclip"])


@pytest.mark.parametrize("optimizer_class", [SPAM, StableSPAM])
def test_no_metrics_before_the_first_step(optimizer_class):
    assert optimizer_class(torch.nn.Linear(2, 2).parameters(), lr=1e-3).metrics() == {}


def test_torch_optimizers_measure_nothing():
    assert optimizer_metrics(stepped(torch.optim.Adam, lr=1e-3)) == {}
