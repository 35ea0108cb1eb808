"""scripts/sweep.py: the plan, the papers' Stable-SPAM recipe per format, a real two-run sweep on a tiny model
(one run diverges), skipping finished and diverged runs, resuming an interrupted one from its checkpoint, and
what counts as finished, diverged or failed."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peft_pretraining.args import build_parser

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "scripts" / "sweep.py"


def load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = load_sweep_module()


def run_sweep(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *argv], capture_output=True, text=True, check=False)


def write_metrics(directory: Path, records: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def fake_checkpoint(directory: Path, step: int) -> None:
    checkpoint = directory / f"model_{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text(json.dumps({"update_step": step}))


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    root = tmp_path / "runs"
    result = run_sweep("--root", str(root), "--formats", "bf16,int4", "--optimizers", "adam_clip,stablespam_corrected",
                       "--lrs", "1e-3,3e-3", "--seeds", "0,1", "--dry-run", "--", "--model_config", "c.json",
                       "--dataset", "sample")
    assert result.returncode == 0, result.stderr
    assert not root.exists()
    assert "16 runs" in result.stdout and "16 new" in result.stdout
    commands = [line.split() for line in result.stdout.splitlines() if line.startswith("         ")]
    assert len(commands) == 16
    first = commands[0][2:]  # after the Python and main_pretrain.py
    assert first == ["--optimizer", "adam", "--grad_clipping", "1.0", "--model_config", "c.json", "--dataset",
                     "sample", "--lr", "1e-3", "--seed", "0", "--save_dir", str(root / "bf16-adam_clip-lr1e-3-s0"),
                     "--name", "bf16-adam_clip-lr1e-3-s0"]
    last = commands[-1]
    assert last[2:8] == ["--act_quant", "--weight_bits", "4", "--weight_group_size", "256", "--optimizer"]
    assert "--optimizer_variant" in last and last[last.index("--optimizer_variant") + 1] == "corrected"
    names = [Path(command[command.index("--save_dir") + 1]).name for command in commands]
    assert len(set(names)) == 16


def test_dry_run_shows_each_runs_state(tmp_path):
    root = tmp_path / "runs"
    write_metrics(root / "bf16-adam-lr1e-3-s0", [{"step": 3, "loss": 1.0}, {"step": 3, "final_eval_loss": 2.0}])
    write_metrics(root / "bf16-adam-lr2e-3-s0", [{"step": 1, "loss": 1.0}])
    fake_checkpoint(root / "bf16-adam-lr2e-3-s0", 1)
    write_metrics(root / "bf16-adam-lr3e-3-s0", [{"step": 1, "loss": float("nan")}])
    result = run_sweep("--root", str(root), "--lrs", "1e-3,2e-3,3e-3,4e-3", "--dry-run")
    assert "1 finished, 1 diverged, 1 resume, 1 new" in result.stdout
    resume_line = result.stdout.splitlines()[result.stdout.splitlines().index("resume   bf16-adam-lr2e-3-s0") + 1]
    assert resume_line.split()[-3:] == ["--continue_from", str(root / "bf16-adam-lr2e-3-s0"), "--restore_optimizer"]


def test_run_status_reads_markers(tmp_path):
    assert sweep.run_status(tmp_path / "absent") == "new"
    run = tmp_path / "run"
    write_metrics(run, [{"step": 1, "loss": 3.0}])
    (run / "model_2").mkdir()  # incomplete: no training_state.json yet
    assert sweep.run_status(run) == "new"
    fake_checkpoint(run, 1)
    assert sweep.run_status(run) == "resume"
    assert sweep.complete_checkpoints(run) == {1: run / "model_1"}
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 2, "lo')  # a line cut short by a kill
    assert sweep.run_status(run) == "resume"
    write_metrics(run, [{"step": 1, "loss": 3.0}, {"step": 2, "skipped_updates": 1, "skipped_in_a_row": 1},
                        {"step": 2, "diverged": True, "skipped_in_a_row": 1}])  # the trainer's stop record
    assert sweep.run_status(run) == "diverged"
    write_metrics(run, [{"step": 1, "loss": float("inf")}])  # a trainer that logged the non-finite loss
    assert sweep.run_status(run) == "diverged"
    write_metrics(run, [{"step": 1, "eval_loss": 2.0, "final_eval_loss": 2.0}])
    assert sweep.run_status(run) == "finished"


@pytest.mark.parametrize("argv, message", [
    (["--formats", "int3"], "unknown format 'int3'"),
    (["--lrs", "fast"], "'fast' is not a number"),
    (["--seeds", "0,0"], "twice"),
    (["--parallel", "0"], "--parallel 0"),
    (["--define-optimizer", "nameonly"], "NAME=FLAGS"),
    (["--", "--seed", "3"], "--seed after `--`"),
    (["--", "--save_dir=x"], "--save_dir after `--`"),
    (["--", "--see", "3"], "--see after `--` abbreviates --seed"),
    (["--", "--num_train=5"], "--num_train after `--` abbreviates --num_training_steps"),
])
def test_bad_grids_fail_with_one_line(tmp_path, argv, message):
    result = run_sweep("--root", str(tmp_path), "--dry-run", *argv)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_lists_every_format_and_preset():
    text = " ".join(run_sweep("--help").stdout.split())
    assert all(name in text for name in [*sweep.FORMATS, *sweep.OPTIMIZERS, *sweep.STABLESPAM_PRESETS])


def test_refused_abbreviations_never_catch_a_real_flag():
    """A main_pretrain.py flag that is a strict prefix of one the sweep sets or reads would be refused wrongly."""
    real_flags = {flag for flag in build_parser()._option_string_actions if flag.startswith("--")}
    guarded = sweep.GRID_FLAGS + sweep.READ_FLAGS
    assert set(guarded) <= real_flags
    assert [(flag, full) for flag in real_flags for full in guarded if flag != full and full.startswith(flag)] == []


def planned_commands(*argv: str) -> dict[str, list[str]]:
    result = run_sweep("--dry-run", *argv)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return {lines[i - 1].split()[1]: lines[i].split()[2:] for i, line in enumerate(lines) if line.startswith("   ")}


def value_of(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_stablespam_presets_follow_the_papers_recipe_per_format(tmp_path):
    commands = planned_commands("--root", str(tmp_path), "--formats", "bf16,int4,fp4,mxfp4,nvfp4,w8",
                                "--define-format", "w8=--act_quant --weight_bits 8",
                                "--optimizers", "stablespam,stablespam_corrected", "--",
                                "--num_training_steps", "50", "--num_training_steps=120")
    assert len(commands) == 12
    for name, command in commands.items():
        format_name, optimizer = name.split("-")[:2]
        four_bit = format_name in ("int4", "fp4", "mxfp4", "nvfp4")
        gammas = ("0.7", "0.9", "0.999") if four_bit else ("0.85", "0.99999", "0.999")
        assert tuple(value_of(command, f"--gamma{i}") for i in (1, 2, 3)) == gammas, name
        assert value_of(command, "--update_proj_gap") == "1000"
        assert value_of(command, "--total_T") == "120"  # the last --num_training_steps, as argparse reads it
        assert value_of(command, "--optimizer_variant") == ("corrected" if optimizer.endswith("corrected") else None)


def test_stablespam_total_t_is_left_alone_and_said_so_when_the_update_count_is_unknown(tmp_path):
    for extra in ([], ["--max_train_tokens", "1M", "--num_training_steps", "9"]):
        result = run_sweep("--root", str(tmp_path), "--dry-run", "--optimizers", "adam,stablespam", "--", *extra)
        note, commands = result.stdout.splitlines()[1], [line for line in result.stdout.splitlines() if "  /" in line]
        assert "--total_T 20000" in note and "pass --num_training_steps" in note
        assert len(commands) == 2 and all("--total_T" not in command for command in commands)
    assert "note" not in run_sweep("--root", str(tmp_path), "--dry-run", "--optimizers", "adam").stdout
    own = run_sweep("--root", str(tmp_path), "--dry-run", "--optimizers", "stablespam",
                    "--define-optimizer", "stablespam=--optimizer stablespam --gamma1 0.5")
    assert "note" not in own.stdout and "--gamma1 0.5 --lr" in own.stdout  # a redefined preset is used as written


def test_defined_presets_replace_and_extend_the_built_in_ones(tmp_path):
    result = run_sweep("--root", str(tmp_path), "--dry-run", "--formats", "int4,w8",
                       "--define-format", "int4=--act_quant --weight_bits 4 --weight_group_size 64",
                       "--define-format", "w8=--act_quant --weight_bits 8",
                       "--optimizers", "ss4", "--define-optimizer", "ss4=--optimizer stablespam --gamma1 0.7")
    commands = [line.split()[2:] for line in result.stdout.splitlines() if line.startswith("         ")]
    assert commands[0][:9] == ["--act_quant", "--weight_bits", "4", "--weight_group_size", "64",
                               "--optimizer", "stablespam", "--gamma1", "0.7"]
    assert commands[1][:3] == ["--act_quant", "--weight_bits", "8"]


def test_a_failing_run_is_reported_and_retried_next_time(tmp_path):
    root = tmp_path / "runs"
    result = run_sweep("--root", str(root), "--launcher", "false", "--lrs", "1e-3,2e-3", "--parallel", "2")
    assert result.returncode == 1
    assert result.stdout.count("FAILED") == 2 and "0 ran (0 diverged), 2 failed" in result.stdout
    assert (root / "bf16-adam-lr1e-3-s0" / "sweep.log").read_text().startswith("$ false ")
    assert "2 new" in run_sweep("--root", str(root), "--lrs", "1e-3,2e-3", "--dry-run").stdout


@pytest.mark.slow
def test_real_sweep_skips_finished_and_diverged_runs_and_resumes_an_interrupted_one(tiny_config, tmp_path):
    """lr 1e30 makes the tiny model's activations overflow by update 3; with --max_skipped_updates 0 the
    trainer stops at the first non-finite update (exit 1), which the sweep reports as diverged, not failed."""
    root = tmp_path / "runs"
    grid = ["--root", str(root), "--optimizers", "adam", "--lrs", "1e-3,1e30", "--", "--model_config",
            str(tiny_config), "--dataset", "sample", "--batch_size", "2", "--max_length", "32",
            "--num_training_steps", "3", "--warmup_steps", "1", "--eval_every", "3", "--save_every", "2",
            "--eval_tokens", "64", "--workers", "0", "--unset_wandb", "--max_skipped_updates", "0"]
    first = run_sweep(*grid)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 ran (1 diverged), 0 failed, 0 skipped" in first.stdout
    runs = [root / "bf16-adam-lr1e-3-s0", root / "bf16-adam-lr1e30-s0"]
    assert "diverged bf16-adam-lr1e30-s0" in first.stdout and "FAILED" not in first.stdout
    assert sweep.run_status(runs[0]) == "finished" and sweep.run_status(runs[1]) == "diverged"
    assert "training stopped" in (runs[1] / "sweep.log").read_text()
    diverged_records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert diverged_records[-1]["diverged"] is True
    assert all(math.isfinite(record["loss"]) for record in diverged_records if "loss" in record)
    for run in runs:
        assert json.loads((run / "run_config.json").read_text())["lr"] == float(run.name.split("-lr")[1][:-3])

    finished_metrics = [(run / "metrics.jsonl").read_text() for run in runs]
    second = run_sweep(*grid)
    assert second.returncode == 0 and "0 ran (0 diverged), 0 failed, 2 skipped" in second.stdout
    assert "1 finished, 1 diverged" in second.stdout  # the diverged run is not retried
    assert [(run / "metrics.jsonl").read_text() for run in runs] == finished_metrics

    # Interrupt the first run after update 3 was logged but before its checkpoint and final evaluation.
    interrupted = runs[0]
    shutil.rmtree(interrupted / "model_3")
    records = [json.loads(line) for line in finished_metrics[0].splitlines()]
    write_metrics(interrupted, [record for record in records if "eval_loss" not in record])
    third = run_sweep(*grid)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "resume   bf16-adam-lr1e-3-s0" in third.stdout
    assert "1 ran (0 diverged), 0 failed, 1 skipped" in third.stdout
    log = (interrupted / "sweep.log").read_text()
    assert f"--continue_from {interrupted} --restore_optimizer" in log
    resumed_line = next(line for line in log.splitlines() if line.startswith("Resumed from"))
    assert str(interrupted / "model_2") in resumed_line  # continued, not restarted
    resumed = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    # main_pretrain dropped what the killed run logged past checkpoint 2: update 3 is logged once.
    assert [record["step"] for record in resumed if "loss" in record] == [1, 2, 3]
    assert sweep.run_status(interrupted) == "finished"


def test_compile_passes_through_to_every_run(tmp_path):
    result = run_sweep("--root", str(tmp_path / "runs"), "--formats", "int4", "--optimizers", "stablespam",
                       "--lrs", "1e-3", "--seeds", "0", "--dry-run", "--", "--model_config", "c.json", "--compile")
    assert result.returncode == 0, result.stderr
    commands = [line.split() for line in result.stdout.splitlines() if line.startswith("         ")]
    assert len(commands) == 1 and "--compile" in commands[0]
