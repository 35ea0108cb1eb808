"""Checkpoint layout: save, find and load (weights, optimizer + scheduler, counters, per-rank state)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from galore_torch import SPAM, StableSPAM
from peft_pretraining.checkpoint import (
    TrainingState,
    find_checkpoint,
    load_checkpoint,
    load_rank_state,
    save_checkpoint,
)
from peft_pretraining.model import build_model
from peft_pretraining.schedules import build_scheduler
from quantization import QuantConfig

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     pad_token_id=None, use_cache=False)


OPTIMIZERS = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2),
    # torch's loader steps a state-less optimizer once (zero gradients, lr 0), which advances StableSPAM's
    # step counter; the loaded counters and weights must not show it.
    "stablespam": lambda model: StableSPAM(model.parameters(), lr=1e-2, gamma1=0.7, gamma2=0.9, gamma3=0.999,
                                           total_T=10, update_proj_gap=2),
    # SPAM creates its masks at construction, so its fresh state is partial.
    "spam": lambda model: SPAM([{"params": [p for p in model.parameters() if p.dim() < 2]},
                                {"params": [p for p in model.parameters() if p.dim() == 2], "density": 0.5,
                                 "update_proj_gap": 2}], lr=1e-2, warmup_epoch=1, grad_accu_steps=1),
}


def trained(seed: int, optimizer_name: str = "adamw"):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    optimizer = OPTIMIZERS[optimizer_name](model)
    scheduler = build_scheduler(optimizer, "cosine", num_training_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_round_trip_restores_weights_optimizer_scheduler_and_counters(tmp_path, optimizer_name):
    model, optimizer, scheduler = trained(seed=0, optimizer_name=optimizer_name)
    state = TrainingState(global_step=6, update_step=3, tokens_seen=96, tokens_seen_before=64, update_time=0.5)
    directory = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                                run_config={"lr": 1e-2}, rank_state={"data": {"next_worker": 1}, "rng": {}})
    assert directory == tmp_path / "model_3"
    assert {p.name for p in directory.iterdir()} >= {"config.json", "model.safetensors", "optimizer.pt",
                                                      "rank_0.pt", "training_state.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["model_3"]  # no temporary directory left behind

    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, optimizer_name=optimizer_name)
    restored = load_checkpoint(directory, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert restored == state
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]  # StableSPAM/SPAM keep their step counters here
    assert loaded["state"].keys() == saved["state"].keys()
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(loaded["state"][index][key]), torch.as_tensor(value)), (index, key)
    assert fresh_scheduler.last_epoch == 3
    assert load_rank_state(directory, rank=0, world_size=1)["data"] == {"next_worker": 1}


def test_weights_only_load_keeps_the_fresh_optimizer(tmp_path):
    model, optimizer, scheduler = trained(seed=0)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                    state=TrainingState(update_step=3), run_config={})
    fresh, fresh_optimizer, _ = trained(seed=1)
    before = {k: v.clone() for k, v in fresh_optimizer.state_dict()["state"][0].items()}
    assert load_checkpoint(tmp_path / "model_3", model=fresh).update_step == 3
    assert all(torch.equal(before[k], v) for k, v in fresh_optimizer.state_dict()["state"][0].items())


def test_quantized_model_checkpoint_loads_as_a_plain_hf_model(tmp_path):
    torch.manual_seed(0)
    model, quantized = build_model(CONFIG, dtype="bfloat16", device=torch.device("cpu"),
                                   weight_quant=QuantConfig("int", bits=4, group_size=32, symmetric=False))
    assert quantized
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, "linear", num_training_steps=5, warmup_steps=1, min_lr_ratio=0.1)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                    state=TrainingState(update_step=1), run_config={})
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "model_1")
    assert plain.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name


def make_checkpoint_dirs(root, steps):
    for step in steps:
        directory = root / f"model_{step}"
        directory.mkdir(parents=True)
        (directory / "training_state.json").write_text(json.dumps({"update_step": step}))


def test_find_checkpoint_picks_the_newest_or_the_requested_step(tmp_path):
    make_checkpoint_dirs(tmp_path, [5, 20, 100])
    (tmp_path / "model_200").mkdir()  # incomplete: no training_state.json
    assert find_checkpoint(tmp_path) == tmp_path / "model_100"
    assert find_checkpoint(tmp_path, step=20) == tmp_path / "model_20"
    assert find_checkpoint(tmp_path / "model_5") == tmp_path / "model_5"  # a checkpoint directory itself


def test_find_checkpoint_errors_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--continue_from"):
        find_checkpoint(tmp_path)
    make_checkpoint_dirs(tmp_path, [5])
    with pytest.raises(FileNotFoundError, match="--resume_step 7"):
        find_checkpoint(tmp_path, step=7)
