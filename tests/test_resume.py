"""Exact resume: a run SIGKILLed mid-way and restarted with --continue_from --restore_optimizer logs the same
per-step losses and ends with the same weights as the uninterrupted run, bit for bit (CPU, float32)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import peft_pretraining
from peft_pretraining.data import build_resumable_train_batches, load_tokenizer, resolve_dataset
from peft_pretraining.metrics import RunLogger, WandbSettings, truncate_metrics
from peft_pretraining.rng import capture_rng_state, restore_rng_state
from peft_pretraining.throughput import MEASURED_KEYS
from quantization import QuantConfig, QuantLinear

REPO = Path(__file__).resolve().parents[1]
STEPS = 5


def run_argv(config: Path, save_dir: Path, *flags: str) -> list[str]:
    return ["--model_config", str(config), "--dataset", "sample", "--tokenizer", "builtin", "--dtype", "float32",
            "--batch_size", "2", "--max_length", "32", "--lr", "1e-2", "--warmup_steps", "2",
            "--num_training_steps", str(STEPS), "--save_every", "2", "--eval_every", "1000", "--eval_tokens", "32",
            "--unset_wandb", "--save_dir", str(save_dir), *flags]


def update_losses(save_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def final_weights(save_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(save_dir / f"model_{STEPS}" / "model.safetensors")


def start_and_kill_after_step(argv: list[str], save_dir: Path, step: int, timeout: float = 240) -> None:
    """Run main_pretrain.py as its own process and SIGKILL it once metrics.jsonl shows `step` (so the
    checkpoint before it is complete), wherever it then is (training, logging or writing a checkpoint)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same threads: same float sums
    process = subprocess.Popen([sys.executable, str(REPO / "main_pretrain.py"), *argv], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not (save_dir / "metrics.jsonl").is_file() or not any(
                s >= step for s, _ in update_losses_tolerant(save_dir)):
            if process.poll() is not None:
                raise AssertionError(f"the run ended before update {step}: {process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no update {step} within {timeout} s")
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def update_losses_tolerant(save_dir: Path) -> list[tuple[int, float]]:
    """Like update_losses, but skips a line the running process is still writing."""
    pairs = []
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            pairs.append((record["step"], record["loss"]))
    return pairs


KILL_AND_RESUME = {
    "stablespam_workers0": ["--optimizer", "stablespam", "--gamma1", "0.7", "--gamma2", "0.9",
                            "--update_proj_gap", "3", "--total_T", "5", "--workers", "0"],
    "spam_density_workers2": ["--optimizer", "spam", "--density", "0.5", "--update_proj_gap", "2",
                              "--warmup_epoch", "1", "--grad_accu_steps", "1", "--workers", "2"],
    "int4_stochastic_packed_workers2": ["--optimizer", "stablespam", "--act_quant", "--weight_bits", "4",
                                        "--weight_group_size", "64", "--act_group_size", "32", "--act_stochastic",
                                        "--packing", "--workers", "2", "--gradient_accumulation", "2"],
    # --compile: compiled layers and optimizer core, stochastic rounding drawn inside the compiled graph,
    # accumulation and the spike monitor; the momentum reset at update 3 comes right after the kill.
    "compiled_int4_stochastic_monitor": ["--compile", "--optimizer", "stablespam", "--update_proj_gap", "3",
                                         "--act_quant", "--weight_bits", "4", "--weight_group_size", "64",
                                         "--act_group_size", "32", "--act_stochastic", "--gradient_accumulation",
                                         "2", "--spike_monitor", "--spike_every", "1", "--workers", "0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("flags", KILL_AND_RESUME.values(), ids=KILL_AND_RESUME.keys())
def test_sigkilled_run_resumes_bitwise(tiny_config, tmp_path, flags):
    peft_pretraining.run(run_argv(tiny_config, tmp_path / "full", *flags))
    expected = update_losses(tmp_path / "full")
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))

    crashed = tmp_path / "crashed"
    start_and_kill_after_step(run_argv(tiny_config, crashed, *flags), crashed, step=3)
    peft_pretraining.run(run_argv(tiny_config, crashed, *flags, "--continue_from", str(crashed),
                                  "--restore_optimizer"))

    assert update_losses(crashed) == expected  # each step once, same bits (float equality of the logged values)
    reference, resumed = final_weights(tmp_path / "full"), final_weights(crashed)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_without_restore_optimizer_weights_and_position_resume_but_optimizer_is_fresh(tiny_config, tmp_path):
    flags = ["--optimizer", "adamw", "--workers", "0"]
    peft_pretraining.run(run_argv(tiny_config, tmp_path / "full", *flags))
    resumed = peft_pretraining.run(run_argv(tiny_config, tmp_path / "resumed", *flags, "--continue_from",
                                            str(tmp_path / "full"), "--resume_step", "2"))
    assert resumed.state.update_step == STEPS and resumed.state.global_step == STEPS
    expected, got = dict(update_losses(tmp_path / "full")), dict(update_losses(tmp_path / "resumed"))
    assert sorted(got) == [3, 4, 5]
    assert got[3] == expected[3]  # same weights, same next batch: the first loss matches exactly
    assert got[5] != expected[5]  # fresh moments and a restarted warm-up change what follows


def test_spike_monitor_and_skip_count_resume_with_the_run(tiny_config, tmp_path):
    """The monitor's running means and the skipped-update total live in each rank's checkpoint file: a fresh
    monitor after resume would score the next gradients against a 1-observation mean and log other values."""
    flags = ["--optimizer", "stablespam", "--workers", "0", "--spike_monitor", "--spike_every", "1",
             "--spike_threshold", "1.5"]
    peft_pretraining.run(run_argv(tiny_config, tmp_path / "full", *flags))
    peft_pretraining.run(run_argv(tiny_config, tmp_path / "resumed", *flags, "--continue_from",
                                  str(tmp_path / "full"), "--resume_step", "2", "--restore_optimizer"))

    def spike_records(save_dir: Path) -> dict[int, dict]:
        records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {key: value for key, value in r.items() if key not in MEASURED_KEYS}
                for r in records if "gss_max" in r}

    full, resumed = spike_records(tmp_path / "full"), spike_records(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4, 5] and full[3]["gss_max"] > 1  # scored against 3 observations, not 1
    for step in (3, 4, 5):
        assert resumed[step] == full[step]


def test_a_refused_resume_leaves_the_run_directory_untouched(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    peft_pretraining.run(run_argv(tiny_config, run_dir, "--optimizer", "adamw", "--workers", "0"))
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    other_workers = run_argv(tiny_config, run_dir, "--optimizer", "adamw", "--workers", "2", "--continue_from",
                             str(run_dir), "--resume_step", "2", "--restore_optimizer")
    assert peft_pretraining.main(other_workers) == 2  # the data position is per worker
    assert "--workers" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_resuming_a_finished_run_leaves_its_final_checkpoint_alone(tiny_config, tmp_path):
    """No update is left to run: the checkpoint it resumed from must not be rewritten (without
    --restore_optimizer that would replace its optimizer state with a fresh one)."""
    run_dir = tmp_path / "run"
    peft_pretraining.run(run_argv(tiny_config, run_dir, "--optimizer", "stablespam", "--workers", "0"))
    final = run_dir / f"model_{STEPS}"
    before = {path.name: path.read_bytes() for path in final.iterdir()}
    result = peft_pretraining.run(run_argv(tiny_config, run_dir, "--optimizer", "stablespam", "--workers", "0",
                                           "--continue_from", str(run_dir)))
    assert result.state.update_step == STEPS
    assert {path.name: path.read_bytes() for path in final.iterdir()} == before


# ---------------------------------------------------------------------------------------------------- pieces


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    model = torch.nn.Sequential(QuantLinear(8, 8, activation_config=QuantConfig("int", bits=4, group_size=8,
                                                                                 stochastic=True)))
    model[0].generator = torch.Generator().manual_seed(7)

    def draws():
        return (random.random(), float(np.random.rand()), torch.rand(2).tolist(),
                torch.rand(2, generator=model[0].generator).tolist())

    torch.save(capture_rng_state(model), tmp_path / "rng.pt")
    expected = draws()
    draws()
    restore_rng_state(model, torch.load(tmp_path / "rng.pt", weights_only=True), source="rng.pt")
    assert draws() == expected

    model[0].generator = None
    with pytest.raises(ValueError, match="rng.pt: .*quantization flags"):
        restore_rng_state(model, torch.load(tmp_path / "rng.pt", weights_only=True), source="rng.pt")


@pytest.mark.parametrize("workers, packing", [(0, False), (2, True)])
def test_resumable_batches_continue_where_the_saved_position_left_off(workers, packing):
    source, tokenizer = resolve_dataset("sample"), load_tokenizer("builtin", 32)
    options = dict(max_length=32, batch_size=3, rank=0, world_size=1, num_workers=workers, packing=packing,
                   shuffle_buffer=16)
    batches = build_resumable_train_batches(source, tokenizer, **options)
    stream = iter(batches)
    for _ in range(5):  # an odd count: with two workers, worker 1 is next
        next(stream)
    saved = batches.state_dict()
    following = [next(stream)["input_ids"] for _ in range(4)]
    del stream

    assert saved["next_worker"] == (5 % workers if workers else 0)
    resumed = iter(build_resumable_train_batches(source, tokenizer, **options, state=saved))
    for expected in following:
        assert torch.equal(next(resumed)["input_ids"], expected)
    del resumed
    with pytest.raises(ValueError, match="rank_0.pt: .*--workers"):
        build_resumable_train_batches(source, tokenizer, **{**options, "num_workers": 1 if workers else 2},
                                      state=saved, state_file="rank_0.pt")


# ---------------------------------------------------------------------------------------------------- logging


class FakeWandb:
    """Records wandb.init's arguments; the run it returns logs nothing."""

    def __init__(self):
        self.inits = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return type("Run", (), {"id": kwargs.get("id", "run-abc123"), "log": lambda *a, **k: None,
                                "finish": lambda self: None})()


def test_a_resumed_run_continues_the_wandb_run_and_drops_metrics_past_the_checkpoint(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    settings = WandbSettings(project="p", name="n")
    first = RunLogger(tmp_path, is_main=True, run_config={}, wandb_settings=settings)
    for step in (1, 2, 3):
        first.log({"loss": float(step)}, step=step)
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "lo')  # the line a SIGKILL cut short
    assert "id" not in fake.inits[0]

    truncate_metrics(tmp_path, after_step=2)
    resumed = RunLogger(tmp_path, is_main=True, run_config={}, wandb_settings=settings, resume=True)
    resumed.log({"loss": 30.0}, step=3)
    resumed.close()
    assert fake.inits[1]["id"] == "run-abc123" and fake.inits[1]["resume"] == "allow"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]

    RunLogger(tmp_path, is_main=True, run_config={}, wandb_settings=settings).close()  # a new run: new wandb run
    assert "id" not in fake.inits[2]


# ---------------------------------------------------------------------------------------------------- two processes


def torchrun(argv: list[str], timeout: float = 240) -> None:
    """main_pretrain.py under torchrun with 2 CPU processes (gloo), in its own session so a hang kills all."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "main_pretrain.py"), *argv]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_run_resumes_bitwise_and_refuses_another_world_size(tiny_config, tmp_path, capsys):
    flags = ["--optimizer", "spam", "--density", "0.5", "--update_proj_gap", "2", "--warmup_epoch", "1",
             "--batch_size", "1", "--total_batch_size", "4", "--workers", "1"]
    torchrun(run_argv(tiny_config, tmp_path / "full", *flags))
    assert {p.name for p in (tmp_path / "full" / "model_2").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    torchrun(run_argv(tiny_config, tmp_path / "resumed", *flags, "--continue_from", str(tmp_path / "full"),
                      "--resume_step", "2", "--restore_optimizer"))

    expected = dict(update_losses(tmp_path / "full"))
    assert update_losses(tmp_path / "resumed") == [(step, expected[step]) for step in range(3, STEPS + 1)]
    reference, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name

    one_process = run_argv(tiny_config, tmp_path / "single", *flags, "--continue_from", str(tmp_path / "full"))
    assert peft_pretraining.main(one_process) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank_0.pt: saved by a run of 2 processes, this run has 1" in err
