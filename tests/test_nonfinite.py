"""Non-finite updates: a NaN/inf loss or gradient skips exactly that update (no optimizer, scheduler or weight
change; counted in the metrics), and too many in a row stop the run with a checkpoint of the last good state."""

import datetime
import gc
import itertools
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaForCausalLM

import peft_pretraining
import peft_pretraining.pretrain
from peft_pretraining.distributed import DistributedContext
from peft_pretraining.metrics import RunLogger
from peft_pretraining.model import compile_layers
from peft_pretraining.schedules import build_scheduler
from peft_pretraining.spike_monitor import GradientSpikeMonitor
from peft_pretraining.trainer import NonFiniteLossError, Trainer, TrainSettings
from optimizer_table import OUR_OPTIMIZERS, PER_LAYER, make_optimizer
from tiny_run import micro_batches, tiny_model

ONE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def poison_gradient(param: nn.Parameter, backward_calls: set[int], value: float = float("nan")):
    """Write `value` into one gradient element on the chosen backward passes (1-based)."""
    calls = itertools.count(1)

    def hook(grad):
        if next(calls) in backward_calls:
            grad = grad.clone()
            grad.view(-1)[0] = value
        return grad

    return param.register_hook(hook)


class NonFiniteLoss(nn.Module):
    """Makes the loss *value* NaN on the chosen forward calls while its gradient stays finite."""

    def __init__(self, model: nn.Module, forward_calls: set[int]):
        super().__init__()
        self.model, self.forward_calls, self.calls = model, forward_calls, 0

    def forward(self, **inputs):
        output = self.model(**inputs)
        self.calls += 1
        if self.calls in self.forward_calls:
            output.loss = output.loss + output.loss.detach() * float("nan")
        return output


def make_trainer(tmp_path, model, optimizer_name, batches, *, updates, accumulation=2, save=None, monitor=None,
                 **settings):
    optimizer = make_optimizer(optimizer_name, model.parameters())
    scheduler = build_scheduler(optimizer, "cosine", num_training_steps=updates, warmup_steps=1, min_lr_ratio=0.1)
    logger = RunLogger(tmp_path, is_main=True, run_config={})
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=scheduler, batches=batches,
                      settings=TrainSettings(num_training_steps=updates, accumulation_steps=accumulation,
                                             total_batch_size=2 * accumulation, **settings),
                      ctx=ONE_PROCESS, logger=logger, save=save, spike_monitor=monitor)
    return trainer, logger


def read_metrics(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(first, second) -> None:
    """Recursively equal, tensors bitwise."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same_tensors(first[key], second[key])
    elif isinstance(first, list | tuple):
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            assert_same_tensors(a, b)
    else:
        assert first == second


def all_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]


def nan_gradient(model: nn.Module) -> nn.Module:
    poison_gradient(model.model.layers[0].mlp.up_proj.weight, {5})
    return model


def inf_gradient(model: nn.Module) -> nn.Module:
    poison_gradient(model.lm_head.weight, {5}, float("inf"))
    return model


# Each returns the module to train, poisoned on micro-batch 5.
POISONS = {"nan_gradient": nan_gradient, "inf_gradient": inf_gradient,
           "nan_loss_finite_gradient": lambda model: NonFiniteLoss(model, {5})}


@pytest.mark.parametrize("optimizer_name", ["adamw", *(name for name in OUR_OPTIMIZERS if name not in PER_LAYER)])
@pytest.mark.parametrize("poison", POISONS)
def test_one_non_finite_update_is_skipped_as_if_its_batches_were_never_there(tmp_path, optimizer_name, poison):
    """Micro-batch 5 (the first of update 3's two) goes bad: the run equals one that never saw batches 5-6."""
    data = micro_batches(12)
    model = tiny_model()
    trainer, logger = make_trainer(tmp_path / "skipped", POISONS[poison](model), optimizer_name, data, updates=5,
                                   monitor=GradientSpikeMonitor(model.named_parameters(), every=1))
    state = trainer.train()
    logger.close()
    clean_model = tiny_model()
    clean, clean_logger = make_trainer(tmp_path / "clean", clean_model, optimizer_name, data[:4] + data[6:],
                                       updates=5, monitor=GradientSpikeMonitor(clean_model.named_parameters(), every=1))
    clean.train()
    clean_logger.close()

    assert (state.update_step, state.global_step, trainer.skipped_updates) == (5, 12, 1)
    assert state.tokens_seen == clean.state.tokens_seen  # tokens of applied updates only
    assert trainer.scheduler.last_epoch == clean.scheduler.last_epoch == 5  # the schedule did not advance for it
    assert_same_tensors(model.state_dict(), clean_model.state_dict())
    assert_same_tensors(trainer.optimizer.state_dict(), clean.optimizer.state_dict())
    assert_same_tensors(trainer.spike_monitor.state_dict(), clean.spike_monitor.state_dict())
    assert all(torch.isfinite(t).all() for t in all_state_tensors(trainer.optimizer) + list(model.parameters()))

    records = read_metrics(tmp_path / "skipped")
    applied = [r for r in records if "loss" in r]
    assert [r for r in records if "loss" not in r] == [{"step": 3, "skipped_updates": 1, "skipped_in_a_row": 1}]
    assert [r["step"] for r in applied] == [1, 2, 3, 4, 5]
    assert [r["skipped_updates"] for r in applied] == [0, 0, 1, 1, 1]
    clean_losses = [r["loss"] for r in read_metrics(tmp_path / "clean")]
    assert [r["loss"] for r in applied] == clean_losses


def test_compiled_run_skips_a_non_finite_update_as_if_its_batches_were_never_there(tmp_path):
    """--compile: compiled decoder layers and StableSPAM's compiled core skip a NaN gradient exactly."""
    data = micro_batches(12)
    models = {}
    for name, batches in (("skipped", data), ("clean", data[:4] + data[6:])):
        model = tiny_model()
        compile_layers(model)
        models[name] = nan_gradient(model) if name == "skipped" else model
        trainer, logger = make_trainer(tmp_path / name, models[name], "stablespam-compiled", batches, updates=5)
        trainer.train()
        logger.close()
        assert trainer.skipped_updates == (1 if name == "skipped" else 0)
    assert_same_tensors(models["skipped"].state_dict(), models["clean"].state_dict())



def test_skips_that_are_not_in_a_row_do_not_stop_the_run(tmp_path):
    model = tiny_model()
    poison_gradient(model.lm_head.weight, {2, 4})  # updates 2 and 4 of accumulation 1, with a good one between
    trainer, logger = make_trainer(tmp_path, model, "adamw", micro_batches(6), updates=4, accumulation=1,
                                   max_skipped_updates=1)
    assert trainer.train().update_step == 4
    logger.close()
    assert trainer.skipped_updates == 2
    skips = [r for r in read_metrics(tmp_path) if "loss" not in r]
    assert [(r["step"], r["skipped_in_a_row"]) for r in skips] == [(2, 1), (3, 1)]


def test_max_skipped_updates_zero_stops_at_the_first_and_saves_the_last_good_state(tmp_path):
    model = tiny_model()
    poison_gradient(model.lm_head.weight, {3})
    saved = []

    def save(state):
        saved.append((state.update_step, {k: v.clone() for k, v in model.state_dict().items()}))

    trainer, logger = make_trainer(tmp_path, model, "stablespam", micro_batches(6), updates=5, accumulation=1,
                                   max_skipped_updates=0, save=save)
    with pytest.raises(NonFiniteLossError, match=r"1 non-finite updates in a row after update 2 "
                                                 r"\(--max_skipped_updates 0\); the last good state is saved"):
        trainer.train()
    logger.close()
    assert [step for step, _ in saved] == [2]
    assert_same_tensors(saved[0][1], model.state_dict())  # skipped updates never touch the weights
    assert all(torch.isfinite(t).all() for t in saved[0][1].values())


# ---------------------------------------------------------------------------------------- the command line

def test_persistent_nan_exits_1_with_one_line_and_a_finite_last_good_checkpoint(tiny_config, tmp_path,
                                                                                   monkeypatch, capsys):
    built = []
    original_build = peft_pretraining.pretrain.build_model

    def build_with_nan_from_update_3(*args, **kwargs):
        model, quantized = original_build(*args, **kwargs)
        poison_gradient(model.model.embed_tokens.weight, set(range(3, 100)))
        built.append(model)
        return model, quantized

    monkeypatch.setattr(peft_pretraining.pretrain, "build_model", build_with_nan_from_update_3)
    save_dir = tmp_path / "run"
    code = peft_pretraining.main(["--model_config", str(tiny_config), "--dataset", "sample", "--batch_size", "2",
                                  "--max_length", "32", "--lr", "1e-2", "--warmup_steps", "1",
                                  "--num_training_steps", "6", "--eval_tokens", "64", "--workers", "0",
                                  "--unset_wandb", "--optimizer", "stablespam", "--max_skipped_updates", "2",
                                  "--save_dir", str(save_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    message = [line for line in err.splitlines() if "training stopped" in line]
    assert message == ["main_pretrain.py: training stopped: 3 non-finite updates in a row after update 2 "
                       "(--max_skipped_updates 2); the last good state is saved as checkpoint 2; lower --lr or "
                       "set --grad_clipping"]

    checkpoints = sorted(p.name for p in save_dir.iterdir() if p.name.startswith("model_"))
    assert checkpoints == ["model_2"]
    counters = json.loads((save_dir / "model_2" / "training_state.json").read_text())
    assert (counters["update_step"], counters["global_step"]) == (2, 5)
    reloaded = LlamaForCausalLM.from_pretrained(save_dir / "model_2")
    for name, tensor in reloaded.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, built[0].state_dict()[name]), name  # the weights after update 2

    records = read_metrics(save_dir)
    assert records[-1] == {"step": 3, "diverged": True, "skipped_in_a_row": 3}  # the stop, for scripts/sweep.py
    assert [r["skipped_in_a_row"] for r in records[:-1] if "loss" not in r] == [1, 2, 3]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


# ---------------------------------------------------------------------------------------- two processes (gloo)

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    """Rank 1's loss (only its value, not its gradient) goes NaN on update 2: both ranks must skip it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A rank that skips alone runs one more update than the other: its collective times out instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        _train_one_rank(rank, out_dir)
        gc.collect()  # DDP's reducer must be gone before its process group: gloo hangs the other way round
    finally:
        dist.destroy_process_group()


def _train_one_rank(rank: int, out_dir: str) -> None:
    ctx = DistributedContext(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    model = tiny_model()
    forward = NonFiniteLoss(model, {2} if rank == 1 else set())
    wrapped = DistributedDataParallel(forward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, "cosine", num_training_steps=3, warmup_steps=1, min_lr_ratio=0.1)
    trainer = Trainer(model=wrapped, optimizer=optimizer, scheduler=scheduler,
                      batches=micro_batches(8)[rank::2],
                      settings=TrainSettings(num_training_steps=3, accumulation_steps=1, total_batch_size=4),
                      ctx=ctx, logger=RunLogger(out_dir, is_main=rank == 0, run_config={}))
    trainer.train()
    torch.save({"params": model.state_dict(), "skipped": trainer.skipped_updates,
                "steps": optimizer.state_dict()["state"][0]["step"]}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_ranks_take_the_same_skip_decision(tmp_path):
    mp.start_processes(_ddp_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    assert float(ranks[0]["steps"]) == float(ranks[1]["steps"]) == 3.0
    assert_same_tensors(ranks[0]["params"], ranks[1]["params"])
