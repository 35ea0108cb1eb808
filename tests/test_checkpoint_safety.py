"""Crash-safe, code-free checkpoints: a kill during a write leaves the previous checkpoint the one resumed,
damaged or foreign checkpoints fail with one line naming the file, and --keep_last prunes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_pretraining
from peft_pretraining.checkpoint import (
    TrainingState,
    find_checkpoint,
    load_checkpoint,
    load_rank_state,
    save_checkpoint,
)
from peft_pretraining.schedules import build_scheduler

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              pad_token_id=None, use_cache=False)


def tiny_run(**overrides):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, "linear", num_training_steps=10, warmup_steps=1, min_lr_ratio=0.1)
    return model, optimizer, scheduler


def save(save_dir: Path, step: int, keep_last: int = 0) -> Path:
    model, optimizer, scheduler = tiny_run()
    return save_checkpoint(save_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                           state=TrainingState(update_step=step), run_config={},
                           rank_state={"data": {}, "rng": {}}, keep_last=keep_last)


def load_into_fresh(directory: Path, **overrides):
    model, optimizer, scheduler = tiny_run(**overrides)
    return load_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler)


def one_line_error(error_type, call, *fragments: str) -> str:
    with pytest.raises(error_type) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    return message


# ------------------------------------------------------------------------------------------------ crash during save

KILL_AT_RENAME = """
import os, signal, sys
import peft_pretraining
from peft_pretraining import checkpoint

move = checkpoint._move_into_place

def killed_at_step_4(tmp, final):
    if final.name == "model_4":
        os.kill(os.getpid(), signal.SIGKILL)  # every file written and synced, the rename not done
    move(tmp, final)

checkpoint._move_into_place = killed_at_step_4
peft_pretraining.run(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_picked(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 32000, "max_sequence_length": 16,
                                  "pad_token_id": -1, "model_type": "llama"}))
    script = tmp_path / "kill_at_rename.py"
    script.write_text(KILL_AT_RENAME)
    save_dir = tmp_path / "run"
    argv = ["--model_config", str(config), "--dataset", "sample", "--batch_size", "1", "--max_length", "16",
            "--num_training_steps", "6", "--warmup_steps", "1", "--save_every", "2", "--eval_every", "100", "--eval_tokens", "16",
            "--workers", "0", "--unset_wandb", "--dtype", "float32", "--save_dir", str(save_dir)]
    done = subprocess.run([sys.executable, str(script), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == -9, done.stderr[-2000:]
    (half_written,) = save_dir.glob(".tmp-model_4-*")
    assert {"model.safetensors", "optimizer.pt", "rank_0.pt", "training_state.json"} <= \
        {p.name for p in half_written.iterdir()}
    assert find_checkpoint(save_dir) == save_dir / "model_2"

    save(save_dir, step=3)  # the next save clears what the crash left
    assert not list(save_dir.glob(".tmp-*"))
    assert find_checkpoint(save_dir) == save_dir / "model_3"


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    save(tmp_path, step=2)
    newer = save(tmp_path, step=4)
    (newer / "training_state.json").unlink()  # the marker is written last: a dir without it is half-written
    (tmp_path / ".tmp-model_6-123").mkdir()
    (tmp_path / ".tmp-model_6-123" / "training_state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "model_2"
    one_line_error(FileNotFoundError, lambda: find_checkpoint(tmp_path, step=4), "--resume_step 4", "[2]")


# ------------------------------------------------------------------------------------------------ damaged files


def test_truncated_weights_are_rejected_with_one_line(tmp_path):
    directory = save(tmp_path, step=2)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(ValueError, lambda: load_into_fresh(directory), str(weights), "truncated or corrupt")


def test_truncated_optimizer_file_is_rejected_with_one_line(tmp_path):
    directory = save(tmp_path, step=2)
    optimizer_file = directory / "optimizer.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    one_line_error(ValueError, lambda: load_into_fresh(directory), str(optimizer_file), "truncated or corrupt")


def test_missing_files_are_named(tmp_path):
    directory = save(tmp_path, step=2)
    (directory / "rank_0.pt").unlink()
    one_line_error(FileNotFoundError, lambda: load_rank_state(directory, rank=0, world_size=1),
                   str(directory / "rank_0.pt"), "missing")
    (directory / "model.safetensors").unlink()
    one_line_error(FileNotFoundError, lambda: load_into_fresh(directory), str(directory / "model.safetensors"))


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path):
    directory = save(tmp_path, step=2)
    marker = tmp_path / "code_ran"
    torch.save({"optimizer": RunsCode(marker), "scheduler": {}}, directory / "optimizer.pt")
    one_line_error(ValueError, lambda: load_into_fresh(directory), str(directory / "optimizer.pt"), "refused")
    torch.save({"world_size": 1, "data": RunsCode(marker), "rng": {}}, directory / "rank_0.pt")
    one_line_error(ValueError, lambda: load_rank_state(directory, rank=0, world_size=1), "rank_0.pt", "refused")
    assert not marker.exists()


def test_a_checkpoint_of_another_model_names_its_config(tmp_path):
    directory = save(tmp_path, step=2)
    one_line_error(ValueError, lambda: load_into_fresh(directory, hidden_size=64),
                   str(directory / "config.json"), "hidden_size 32 vs 64", "--model_config")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))  # config lies: shapes don't
    one_line_error(ValueError, lambda: load_into_fresh(directory, hidden_size=64), "does not fit this run")


def test_rank_state_from_another_world_size_is_rejected(tmp_path):
    directory = save(tmp_path, step=2)
    one_line_error(ValueError, lambda: load_rank_state(directory, rank=0, world_size=2),
                   str(directory / "rank_0.pt"), "1 processes", "this run has 2")


def test_a_damaged_checkpoint_exits_2_from_the_command_line(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**CONFIG, "vocab_size": 32000, "max_sequence_length": 16, "model_type": "llama"}))
    directory = save(tmp_path / "old", step=2)
    (directory / "optimizer.pt").write_bytes(b"not a checkpoint")
    argv = ["--model_config", str(config), "--dataset", "sample", "--batch_size", "1", "--max_length", "16",
            "--num_training_steps", "3", "--warmup_steps", "1", "--workers", "0", "--unset_wandb", "--dtype", "float32",
            "--save_dir", str(tmp_path / "run"), "--continue_from", str(tmp_path / "old"), "--restore_optimizer"]
    capsys.readouterr()  # what saving the checkpoint printed
    assert peft_pretraining.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main_pretrain.py: error:") and str(directory) in err


# ------------------------------------------------------------------------------------------------ pruning


def test_keep_last_keeps_exactly_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_6", "model_8"]
    for step in (10, 12):
        save(tmp_path, step=step)  # keep_last 0: keep everything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_10", "model_12", "model_6", "model_8"]
