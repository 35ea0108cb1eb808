"""The update loop on in-memory batches: accumulation, pad masking, update count, hook cadence, divergence
(non-finite updates in detail: test_nonfinite.py)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_pretraining.distributed import DistributedContext
from peft_pretraining.metrics import RunLogger
from peft_pretraining.schedules import build_scheduler
from peft_pretraining.trainer import NonFiniteLossError, Trainer, TrainSettings

ONE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, pad_token_id=None, use_cache=False))


def full_batches(count: int, batch_size: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (count * batch_size, 8), generator=generator)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size)]


def train(tmp_path, batches, *, updates: int, accumulation: int, batch_size: int, **settings):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = build_scheduler(optimizer, "cosine", num_training_steps=updates, warmup_steps=0, min_lr_ratio=0.1)
    logger = RunLogger(tmp_path, is_main=True, run_config={})
    hooks = {"evaluated": [], "saved": []}
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, batches=batches,
                      settings=TrainSettings(num_training_steps=updates, accumulation_steps=accumulation,
                                             total_batch_size=batch_size * accumulation, **settings),
                      ctx=ONE_PROCESS, logger=logger,
                      evaluate=lambda: hooks["evaluated"].append(trainer.state.update_step) or {"eval_loss": 1.0},
                      save=lambda state: hooks["saved"].append(state.update_step))
    state = trainer.train()
    logger.close()
    return model, state, hooks


def test_accumulating_two_halves_equals_one_full_batch(tmp_path):
    data = full_batches(count=6, batch_size=2)
    halves, _, _ = train(tmp_path / "a", data, updates=3, accumulation=2, batch_size=2)
    merged = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(data[::2], data[1::2], strict=True)]
    whole, _, _ = train(tmp_path / "b", merged, updates=3, accumulation=1, batch_size=4)
    for p, q in zip(halves.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_pad_tokens_do_not_affect_training(tmp_path):
    data = full_batches(count=2, batch_size=2)
    for batch in data:
        batch["attention_mask"][:, 5:] = 0
    other_pads = [{"input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 7),
                   "attention_mask": b["attention_mask"]} for b in data]
    first, _, _ = train(tmp_path / "a", data, updates=2, accumulation=1, batch_size=2)
    second, _, _ = train(tmp_path / "b", other_pads, updates=2, accumulation=1, batch_size=2)
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_exact_update_count_and_hook_cadence(tmp_path):
    _, state, hooks = train(tmp_path, iter(full_batches(count=14, batch_size=1)), updates=7, accumulation=2,
                            batch_size=1, eval_every=3, save_every=3)
    assert (state.update_step, state.global_step, state.tokens_seen) == (7, 14, 14 * 8)
    assert hooks["evaluated"] == [3, 6]  # the final evaluation belongs to the caller
    assert hooks["saved"] == [3, 6, 7]  # and a checkpoint at the end
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 8))
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]


def test_no_second_save_when_the_last_update_was_saved(tmp_path):
    _, _, hooks = train(tmp_path, full_batches(count=4, batch_size=1), updates=4, accumulation=1, batch_size=1,
                        save_every=2)
    assert hooks["saved"] == [2, 4]


def test_gradient_clipping_limits_the_norm(tmp_path):
    train(tmp_path, full_batches(count=3, batch_size=2), updates=3, accumulation=1, batch_size=2,
          grad_clipping=0.01)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0.01 and r["grad_norm_afterclip"] == pytest.approx(0.01) for r in records)


def test_persistent_non_finite_loss_stops_the_run_after_the_allowed_skips(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, "linear", num_training_steps=5, warmup_steps=0, min_lr_ratio=0.1)
    saved = []
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, batches=full_batches(5, 1),
                      settings=TrainSettings(num_training_steps=5, accumulation_steps=1, total_batch_size=1,
                                             max_skipped_updates=2),
                      ctx=ONE_PROCESS, logger=RunLogger(tmp_path, is_main=True, run_config={}),
                      save=lambda state: saved.append(state.update_step))
    with pytest.raises(NonFiniteLossError, match="3 non-finite updates in a row after update 0"):
        trainer.train()
    # The weights themselves are NaN here, so no "last good state" checkpoint is written over a good one.
    assert saved == []
    assert (trainer.state.update_step, trainer.state.global_step, trainer.skipped_updates) == (0, 3, 3)
