"""The gradient-spike monitor inside the training loop: cadence in metrics.jsonl, observation before clipping
(a planted 1000x spike against a hand computation), no host read per micro-batch, and resume of its state."""

import dataclasses
import io
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import peft_pretraining
from galore_torch.spam import SPAM
from galore_torch.stable_spam import StableSPAM
from peft_pretraining.distributed import DistributedContext
from peft_pretraining.metrics import RunLogger
from peft_pretraining.spike_monitor import GradientSpikeMonitor
from peft_pretraining.throughput import MEASURED_KEYS
from peft_pretraining.trainer import Trainer, TrainSettings, optimizer_metrics
from tiny_run import micro_batches, tiny_model

ONE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
LLAMA_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
               "lm_head", "norm")
SPIKE_KEYS = {f"spikes/{kind}" for kind in LLAMA_TYPES} | {"spikes/total", "gss_max"}
STABLESPAM_KEYS = {f"stablespam/{name}_{stat}" for name in ("clip_threshold", "norm_scale")
                   for stat in ("mean", "min", "max")}


def constant_schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def train(directory, model, optimizer, batches, *, updates, accumulation=1, monitor=None, state=None,
          extra_state=None, **settings) -> Trainer:
    logger = RunLogger(directory, is_main=True, run_config={}, resume=state is not None)
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=constant_schedule(optimizer), batches=batches,
                      settings=TrainSettings(num_training_steps=updates, accumulation_steps=accumulation,
                                             total_batch_size=2 * accumulation, **settings),
                      ctx=ONE_PROCESS, logger=logger, state=state, spike_monitor=monitor)
    if extra_state is not None:
        trainer.load_extra_state(extra_state)
    trainer.train()
    logger.close()
    return trainer


def read_metrics(directory) -> list[dict]:
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


def test_spike_keys_reach_metrics_at_the_cadence_through_the_command_line(tmp_path):
    config = tmp_path / "llama_tiny.json"
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "vocab_size": 32000, "max_sequence_length": 64,
                                  "hidden_act": "silu", "rms_norm_eps": 1e-6, "initializer_range": 0.02,
                                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1, "model_type": "llama"}))
    save_dir = tmp_path / "run"
    peft_pretraining.run(["--model_config", str(config), "--dataset", "sample", "--batch_size", "2",
                          "--max_length", "32", "--lr", "1e-2", "--warmup_steps", "1", "--num_training_steps", "7",
                          "--eval_tokens", "64", "--workers", "0", "--unset_wandb", "--save_dir", str(save_dir),
                          "--optimizer", "stablespam", "--spike_monitor", "--spike_every", "3",
                          "--spike_threshold", "1.5"])
    updates = [r for r in read_metrics(save_dir) if "loss" in r]
    assert [r["step"] for r in updates] == list(range(1, 8))
    observed = {r["step"]: r for r in updates if "gss_max" in r}
    assert list(observed) == [3, 6]
    for record in updates:  # the optimizer's own statistics are on every line, the monitor's at its cadence
        expected = SPIKE_KEYS | STABLESPAM_KEYS if record["step"] in observed else STABLESPAM_KEYS
        assert set(record) & (SPIKE_KEYS | STABLESPAM_KEYS) == expected
    assert observed[3]["gss_max"] == pytest.approx(1.0)  # the first observation scores every element 1
    assert observed[3]["spikes/total"] == 0
    # The second observation can score up to 2 > 1.5; the per-type counts add up to the total.
    assert 1.0 < observed[6]["gss_max"] <= 2.0
    assert observed[6]["spikes/total"] == sum(observed[6][f"spikes/{kind}"] for kind in LLAMA_TYPES) > 0
    assert all(0 < observed[6][key] < float("inf") for key in STABLESPAM_KEYS)


def test_spam_post_clip_norm_is_on_every_line_under_its_own_key(tmp_path):
    """`grad_norm_afterclip` is the norm after our --grad_clipping for SPAM as for any optimizer; SPAM's own
    post-clip norm (of its masked, spike-clipped gradient) is `spam/grad_norm_afterclip`, on every line."""
    model = tiny_model()
    optimizer = SPAM(model.parameters(), lr=1e-2, warmup_epoch=2, grad_accu_steps=2)
    train(tmp_path, model, optimizer, micro_batches(4), updates=4,
          monitor=GradientSpikeMonitor(model.named_parameters(), every=2), grad_clipping=0.5)
    updates = read_metrics(tmp_path)
    assert [r["step"] for r in updates] == [1, 2, 3, 4]
    assert [r["step"] for r in updates if "gss_max" in r] == [2, 4]
    assert all(0 < r["spam/grad_norm_afterclip"] < float("inf") for r in updates)
    assert all(r["grad_norm_afterclip"] == pytest.approx(min(r["grad_norm"], 0.5)) for r in updates)


def test_planted_1000x_spike_is_counted_and_scored_before_clipping(tmp_path):
    """lr 0 and one repeated batch: every update has the same gradients (each element scores 1), until update
    60 multiplies one q_proj element by 1000. Clipping to 1e-3 rescales each update differently; scores taken
    after it would not match the hand computation."""
    model = tiny_model()
    planted_at, calls = 60, itertools.count(1)

    def plant(grad):
        if next(calls) == planted_at:
            grad = grad.clone()
            grad[0, 0] *= 1000
        return grad

    model.model.layers[0].self_attn.q_proj.weight.register_hook(plant)
    batch = micro_batches(1)[0]
    train(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.0), [batch] * planted_at, updates=planted_at,
          monitor=GradientSpikeMonitor(model.named_parameters(), every=1), grad_clipping=1e-3)
    records = read_metrics(tmp_path)
    assert all(r["grad_norm_afterclip"] == pytest.approx(1e-3) for r in records)
    before, planted = records[:-1], records[-1]
    assert all(r["spikes/total"] == 0 and r["gss_max"] == pytest.approx(1.0, rel=1e-5) for r in before)
    # 60 observations: 59 of |g| and one of 1000|g|, so GSS = 1000 |g| / ((59 + 1000) |g| / 60)
    assert planted["gss_max"] == pytest.approx(1000 * 60 / 1059, rel=1e-5)
    assert planted["spikes/q_proj"] == planted["spikes/total"] == 1


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
LOOP_FILES = {"trainer.py", "spike_monitor.py", "spam.py", "stable_spam.py"}


def count_loop_host_reads(monkeypatch) -> Counter:
    """Count Python-level reads of a tensor's value made by the training loop or the monitor's code."""
    reads = Counter()
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, _method=method, **kwargs):
            if Path(sys._getframe(1).f_code.co_filename).name in LOOP_FILES:
                reads[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    return reads


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("monitored", [False, True])
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, SPAM, StableSPAM])
def test_the_loop_reads_the_host_once_per_update_whatever_the_micro_batches_the_monitor_and_the_optimizer(
        tmp_path, monkeypatch, accumulation, monitored, optimizer_class):
    """On CPU every sync is invisible, so this counts what would be one: each Python-level read of a tensor's
    value (item, tolist, bool(), float(), int(), ...) from trainer.py, spike_monitor.py and the optimizers'
    modules. Per update: one tolist (the sync) and one int() of the host-side token count; the monitor's
    values and the optimizer's `metrics()` ride on the next update's tolist, plus one at the end for the last
    update. It cannot see syncs inside torch ops."""
    model = tiny_model()
    optimizer = optimizer_class(model.parameters(), lr=1e-2)
    monitor = GradientSpikeMonitor(model.named_parameters(), every=1) if monitored else None
    updates = 5
    reads = count_loop_host_reads(monkeypatch)
    train(tmp_path, model, optimizer, micro_batches(updates * accumulation), updates=updates,
          accumulation=accumulation, monitor=monitor)
    monkeypatch.undo()
    pending = monitored or optimizer_class is not torch.optim.SGD
    assert reads == {"tolist": updates + (1 if pending else 0), "__int__": updates}
    records = read_metrics(tmp_path)
    assert len(records) == updates and all(("gss_max" in r) == monitored for r in records)
    measured = set(optimizer_metrics(optimizer))
    assert all(measured <= set(r) for r in records)
    assert bool(measured) == (optimizer_class is not torch.optim.SGD)


def test_extra_state_resumes_the_monitor_and_the_skip_count_exactly(tmp_path):
    """Updates 1-6 in one go equal 1-3, a round trip of `extra_state()` through torch.save/load(weights_only),
    and 4-6 with a fresh monitor; attempt 2 is non-finite (skipped) in both."""
    data = micro_batches(7)

    def poisoned_model():
        model = tiny_model()
        calls = itertools.count(1)
        model.lm_head.weight.register_hook(lambda g: g * float("nan") if next(calls) == 2 else g)
        return model

    def monitor(model):
        return GradientSpikeMonitor(model.named_parameters(), every=1, threshold=1.2)

    whole = poisoned_model()
    train(tmp_path / "whole", whole, torch.optim.SGD(whole.parameters(), lr=0.3), data, updates=6,
          monitor=monitor(whole))

    resumed = poisoned_model()
    first = train(tmp_path / "resumed", resumed, torch.optim.SGD(resumed.parameters(), lr=0.3), data[:4],
                  updates=3, monitor=monitor(resumed))
    buffer = io.BytesIO()
    torch.save(first.extra_state(), buffer)
    buffer.seek(0)
    extra = torch.load(buffer, weights_only=True)
    second = train(tmp_path / "resumed", resumed, torch.optim.SGD(resumed.parameters(), lr=0.3), data[4:],
                   updates=6, monitor=monitor(resumed), state=dataclasses.replace(first.state),
                   extra_state=extra)

    assert second.skipped_updates == 1 and extra["skipped_updates"] == 1

    def comparable(record: dict) -> dict:  # everything but the timings
        return {k: v for k, v in record.items() if k not in MEASURED_KEYS}

    expected = [comparable(r) for r in read_metrics(tmp_path / "whole")]
    assert [comparable(r) for r in read_metrics(tmp_path / "resumed")] == expected
    assert [r["step"] for r in expected] == [1, 2, 2, 3, 4, 5, 6]  # the skipped attempt logs under step 2
    assert sum(r["spikes/total"] for r in expected if r["step"] > 3) > 0  # counted spikes are compared too
