"""The paper launchers in scripts/paper/: every published cell dry-runs to a command that main_pretrain.py
accepts and that carries the paper's settings (Stable-SPAM Tables 1, 2, 6, 7; docs/algorithms.md#f) on any GPU count;
the run name follows every setting that changes the run; a relaunch resumes from the run's checkpoint."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from peft_pretraining.args import build_parser, parse_args, resolve_batch_arithmetic

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "scripts" / "paper"

# The paper's published perplexities (Stable-SPAM v2 Table 1 and Table 2), transcribed independently of
# scripts/paper/cells.tsv so that a typo there fails here.
TABLE1 = {  # optimizer: (INT4 130M, 350M, 1B, FP4 130M, 350M, 1B)
    "adam": (26.4, 24.14, 21.59, 28.9, 24.59, 22.01),
    "adam_clip": (26.30, 21.64, 19.74, 28.27, 20.84, 20.25),
    "adafactor": (25.11, 20.45, 20.65, 26.89, 20.53, 20.03),
    "spam": (25.03, 20.19, 19.98, 26.78, 20.35, 19.74),
    "stablespam": (24.33, 17.76, 17.42, 26.31, 19.49, 18.48),
}
TABLE1_BF16_ADAM = {"130m": 24.53, "350m": 21.38, "1b": 19.73}
TABLE2 = {  # optimizer: (60M, 130M, 350M, 1B)
    "adam": (34.09, 24.91, 18.77, 16.13),
    "adam_clip": (33.33, 24.88, 18.51, 15.22),
    "adafactor": (32.57, 23.98, 17.74, 15.19),
    "spam": (30.46, 23.36, 17.42, 14.66),
    "stablespam": (28.84, 22.21, 16.85, 13.90),
}
# Tables 6 (4-bit) and 7 (BF16): lr per size; gammas; reset interval 1000.
LR_4BIT = {"130m": 1e-3, "350m": 4e-4, "1b": 2e-4}
LR_BF16 = {"60m": 1e-3, "130m": 8e-4, "350m": 4e-4, "1b": 2e-4}
GAMMAS = {"4bit": (0.7, 0.9, 0.999), "bf16": (0.85, 0.99999, 0.999)}
# Training tokens -> updates of 512 x 256 tokens (the lineage's labels; 11.6B / 131072 for the 1B BF16 run).
STEPS = {"1.1B": 10_000, "2.2B": 20_000, "6.4B": 60_000, "11.6B": 88_500}
TABLE2_TOKENS = {"60m": "1.1B", "130m": "2.2B", "350m": "6.4B", "1b": "11.6B"}


def read_manifest() -> dict[str, dict]:
    lines = [line for line in (PAPER / "cells.tsv").read_text().splitlines() if not line.startswith("#")]
    header = lines[0].split("\t")
    return {row[0]: dict(zip(header, row)) for row in (line.split("\t") for line in lines[1:])}


def expected_cells() -> dict[str, float]:
    """Cell id -> published perplexity, from the paper tables above."""
    cells = {}
    for optimizer, values in TABLE1.items():
        for index, ppl in enumerate(values):
            cells[f"t1-{('int4', 'fp4')[index // 3]}-{('130m', '350m', '1b')[index % 3]}-{optimizer}"] = ppl
    for size, ppl in TABLE1_BF16_ADAM.items():
        cells[f"t1-bf16-{size}-adam"] = ppl
    for optimizer, values in TABLE2.items():
        for size, ppl in zip(("60m", "130m", "350m", "1b"), values):
            cells[f"t2-bf16-{size}-{optimizer}"] = ppl
    return cells


MANIFEST = read_manifest()


@pytest.fixture(autouse=True)
def empty_working_directory(tmp_path, monkeypatch):
    """The default RUNS_DIR is relative: keep real runs (and their checkpoints) out of the dry runs."""
    monkeypatch.chdir(tmp_path)


def clean_env(**overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DRY_RUN", "NGPU", "NNODES", "RDZV_ENDPOINT", "RDZV_ID", "BATCH_SIZE", "SEED", "LR",
                          "STEPS", "WARMUP", "RESET", "RUNS_DIR", "SAVE_EVERY", "FRESH", "CUDA_VISIBLE_DEVICES",
                          "SLURM_GPUS_ON_NODE")}
    return {**env, **overrides}


def launch(script: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PAPER / script), *argv], capture_output=True, text=True,
                          env=clean_env(**env), check=False)


def dry_run(script: str, *argv: str, **env: str) -> tuple[str, list[str]]:
    """(summary line, command tokens) of a dry run."""
    result = launch(script, *argv, **{"DRY_RUN": "1", "NGPU": "4", **env})
    assert result.returncode == 0, result.stderr
    summary, command = result.stdout.strip().splitlines()
    assert summary.startswith("# ")
    return summary, shlex.split(command)


def main_pretrain_args(command: list[str], world_size: int):
    entry = next(i for i, token in enumerate(command) if token.endswith("main_pretrain.py"))
    args = parse_args(command[entry + 1:])
    resolve_batch_arithmetic(args, world_size)
    return args


def test_manifest_lists_every_published_cell_with_its_perplexity():
    assert {cell: float(row["paper_ppl"]) for cell, row in MANIFEST.items()} == expected_cells()


@pytest.mark.parametrize("cell", sorted(MANIFEST))
def test_every_cell_dry_runs_with_the_paper_settings(cell):
    table, precision, size, optimizer = cell.split("-")
    summary, command = dry_run("launch.sh", cell)
    args = main_pretrain_args(command, world_size=4)

    assert Path(args.model_config) == REPO / "configs" / f"llama_{size}.json"
    assert args.dtype == "bfloat16"
    assert (args.total_batch_size, args.max_length) == (512, 256)
    assert args.batch_size * 4 * args.gradient_accumulation == 512
    assert args.num_training_steps == STEPS[MANIFEST[cell]["tokens"]]
    assert MANIFEST[cell]["tokens"] == ("2.2B" if table == "t1" else TABLE2_TOKENS[size])
    assert args.lr == (LR_4BIT[size] if precision != "bf16" else LR_BF16[size])
    assert (args.scheduler, args.min_lr_ratio, args.weight_decay, args.eval_every) == ("cosine", 0.1, 0.0, 1000)
    assert (args.save_every, args.keep_last, args.continue_from) == (1000, 2, None)
    assert args.warmup_steps == (1000 if (table, optimizer) == ("t2", "spam") else 2000)

    # Precision as the reference effectively ran it: INT4 W4A4 group 256 round-to-nearest, reference FP4.
    assert args.act_quant == (precision == "int4")
    assert args.fp4 == (precision == "fp4")
    assert args.weight_format is None and args.act_format is None
    if precision == "int4":
        assert (args.weight_bits, args.act_bits) == (4, 4)
        assert (args.weight_group_size, args.act_group_size, args.act_topk) == (256, 256, 2)
        assert not args.act_stochastic and not args.stochastic_round

    assert args.optimizer == {"adam_clip": "adam"}.get(optimizer, optimizer)
    assert args.grad_clipping == (1.0 if optimizer == "adam_clip" else 0.0)
    assert args.optimizer_variant == "reference"
    if optimizer == "stablespam":
        assert (args.gamma1, args.gamma2, args.gamma3) == GAMMAS["bf16" if precision == "bf16" else "4bit"]
        assert (args.update_proj_gap, args.total_T, args.eta) == (1000, args.num_training_steps, 0.5)
    if optimizer == "spam":
        assert (args.density, args.update_proj_gap, args.grad_accu_steps) == (1.0, 500, 20)
        # Table 1: the StableSPAM repo's SPAM defaults (docs/algorithms.md#b1); Table 2: the SPAM paper's code,
        # which passed the lr warm-up as the post-reset warm-up (docs/algorithms.md#b6).
        assert (args.threshold, args.warmup_epoch) == ((5000, 1000) if table == "t2" else (2000, 150))

    run_name = f"{cell}-lr{MANIFEST[cell]['lr']}-s0"
    assert args.name == run_name and Path(args.save_dir) == Path("runs/paper") / run_name
    assert f"paper ppl {MANIFEST[cell]['paper_ppl']}" in summary


def test_run_names_and_save_dirs_differ_across_cells():
    names = {main_pretrain_args(dry_run("launch.sh", cell)[1], 4).save_dir for cell in MANIFEST}
    assert len(names) == len(MANIFEST)


def test_table_wrappers_resolve_to_the_same_cell():
    assert dry_run("table1.sh", "stablespam", "fp4", "1b") == dry_run("launch.sh", "t1-fp4-1b-stablespam")
    assert dry_run("table2.sh", "spam", "60m") == dry_run("launch.sh", "t2-bf16-60m-spam")


def test_dry_run_flag_and_passthrough_flags():
    _, command = dry_run("table2.sh", "adam", "130m", "--dataset", "sample", "--dry-run", "--workers", "2",
                         DRY_RUN="0")
    assert command[-4:] == ["--dataset", "sample", "--workers", "2"]  # after the cell's flags: they win
    args = main_pretrain_args(command, 4)
    assert (args.dataset, args.workers) == ("sample", 2)
    assert args.name == "t2-bf16-130m-adam-lr8e-4-s0-sample"


@pytest.mark.parametrize("flags, tags", [
    (["--dataset", "c4"], ""),
    (["--dataset=/data/my corpus/"], "-my_corpus"),
    (["--dataset", "sample", "--dataset", "/data/web.jsonl"], "-web.jsonl"),  # argparse: the last one wins
    (["--optimizer_variant", "corrected"], "-corrected"),
    (["--optimizer_variant=reference"], ""),
    (["--packing", "--optimizer_variant=corrected", "--dataset", "sample"], "-sample-corrected-packed"),
])
def test_passthrough_flags_that_change_the_run_tag_its_name(flags, tags):
    args = main_pretrain_args(dry_run("launch.sh", "t1-int4-130m-stablespam", *flags)[1], 4)
    assert args.name == "t1-int4-130m-stablespam-lr1e-3-s0" + tags
    assert Path(args.save_dir).name == args.name


def test_gpu_and_node_counts_change_the_launcher_not_the_total_batch():
    _, single = dry_run("launch.sh", "t1-int4-350m-adam", NGPU="1")
    assert single[:single.index("--nproc_per_node") + 2] == ["torchrun", "--standalone", "--nnodes", "1",
                                                              "--nproc_per_node", "1"]
    args = main_pretrain_args(single, 1)
    assert (args.batch_size, args.gradient_accumulation, args.total_batch_size) == (128, 4, 512)

    _, multi = dry_run("launch.sh", "t1-int4-1b-adam", NGPU="8", NNODES="2", RDZV_ENDPOINT="node0:29400")
    launcher = multi[:multi.index(next(t for t in multi if t.endswith("main_pretrain.py")))]
    assert "--standalone" not in launcher
    for flag, value in (("--nnodes", "2"), ("--nproc_per_node", "8"), ("--rdzv_backend", "c10d"),
                        ("--rdzv_endpoint", "node0:29400"), ("--rdzv_id", "t1-int4-1b-adam-lr2e-4-s0")):
        assert launcher[launcher.index(flag) + 1] == value
    args = main_pretrain_args(multi, 16)
    assert (args.batch_size, args.gradient_accumulation) == (32, 1)

    args = main_pretrain_args(dry_run("launch.sh", "t1-int4-1b-adam", NGPU="2", BATCH_SIZE="16")[1], 2)
    assert (args.batch_size, args.gradient_accumulation, args.total_batch_size) == (16, 16, 512)


def test_seed_lr_and_steps_from_the_environment_rename_the_run():
    _, command = dry_run("launch.sh", "t1-fp4-130m-stablespam", SEED="2", LR="3e-3", STEPS="5000",
                         RUNS_DIR="/tmp/elsewhere")
    args = main_pretrain_args(command, 4)
    assert (args.seed, args.lr, args.num_training_steps, args.total_T) == (2, 3e-3, 5000, 5000)
    assert args.warmup_steps == 500  # min(the paper's 2000, STEPS / 10)
    assert args.name == "t1-fp4-130m-stablespam-lr3e-3-s2-n5000"
    assert args.save_dir == "/tmp/elsewhere/t1-fp4-130m-stablespam-lr3e-3-s2-n5000"


@pytest.mark.parametrize("env, warmup, suffix", [
    ({"STEPS": "30000"}, 1000, "-n30000"),  # the paper's warm-up (1000 for this row) when short enough
    ({"STEPS": "15"}, 1, "-n15"),
    ({"STEPS": "100", "WARMUP": "40"}, 40, "-n100-w40"),
    ({"WARMUP": "0"}, 0, "-w0"),
])
def test_warm_up_shrinks_with_steps_or_comes_from_warmup(env, warmup, suffix):
    summary, command = dry_run("launch.sh", "t2-bf16-60m-spam", **env)
    args = main_pretrain_args(command, 4)
    assert args.warmup_steps == args.warmup_epoch == warmup  # Table 2's SPAM: post-reset warm-up = lr warm-up
    assert args.name == "t2-bf16-60m-spam-lr1e-3-s0" + suffix
    assert f"(warm-up {warmup})" in summary


def test_reset_overrides_the_momentum_reset_interval_and_names_the_run():
    args = main_pretrain_args(dry_run("launch.sh", "t1-int4-350m-stablespam", RESET="500")[1], 4)
    assert (args.update_proj_gap, args.name) == (500, "t1-int4-350m-stablespam-lr4e-4-s0-r500")
    args = main_pretrain_args(dry_run("launch.sh", "t2-bf16-130m-spam", RESET="250")[1], 4)
    assert (args.update_proj_gap, args.name) == (250, "t2-bf16-130m-spam-lr8e-4-s0-r250")


def make_checkpoint(run_dir: Path, step: int, complete: bool = True) -> None:
    (run_dir / f"model_{step}").mkdir(parents=True)
    if complete:
        (run_dir / f"model_{step}" / "training_state.json").write_text('{"update_step": %d}' % step)


def test_a_relaunch_resumes_from_the_runs_newest_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "t2-bf16-60m-adam-lr1e-3-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")  # a run killed before its first checkpoint: nothing to resume
    summary, command = dry_run("launch.sh", "t2-bf16-60m-adam", RUNS_DIR=str(tmp_path / "runs"))
    assert "--continue_from" not in command and summary.endswith("fresh start")

    make_checkpoint(run_dir, 1000)
    make_checkpoint(run_dir, 2000)
    make_checkpoint(run_dir, 3000, complete=False)  # being written when the job was killed
    summary, command = dry_run("launch.sh", "t2-bf16-60m-adam", "--workers", "2", RUNS_DIR=str(tmp_path / "runs"))
    assert command[-5:] == ["--continue_from", str(run_dir), "--restore_optimizer", "--workers", "2"]
    assert summary.endswith(f"resumes from {run_dir}/model_2000")
    args = main_pretrain_args(command, 4)
    assert (args.continue_from, args.restore_optimizer) == (str(run_dir), True)

    result = launch("launch.sh", "t2-bf16-60m-adam", DRY_RUN="1", NGPU="4", RUNS_DIR=str(tmp_path / "runs"),
                    FRESH="1")
    assert result.returncode == 2 and "FRESH=1 but" in result.stderr and "model_2000" in result.stderr
    summary, command = dry_run("launch.sh", "t2-bf16-60m-adam", RUNS_DIR=str(tmp_path / "elsewhere"), FRESH="1")
    assert "--continue_from" not in command and summary.endswith("fresh start (FRESH=1)")


@pytest.mark.parametrize("env, processes", [
    ({"CUDA_VISIBLE_DEVICES": "0,3", "SLURM_GPUS_ON_NODE": "8"}, 2),  # what this process may use wins
    ({"CUDA_VISIBLE_DEVICES": ""}, 1),  # no GPU: one process
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({}, 4),  # the stand-in nvidia-smi lists 4
])
def test_gpu_count_prefers_the_visible_devices_over_nvidia_smi(tmp_path, env, processes):
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n')
    fake.chmod(0o755)
    result = launch("launch.sh", "t1-int4-130m-adam", DRY_RUN="1", PATH=f"{tmp_path}:{os.environ['PATH']}", **env)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.splitlines()[1])
    assert command[command.index("--nproc_per_node") + 1] == str(processes)


@pytest.mark.parametrize("argv, env, message", [
    (("t9-int4-130m-adam",), {}, "unknown cell"),
    (("t1-int4-130m-adam",), {"NGPU": "3"}, "does not divide"),
    (("t1-int4-130m-adam",), {"NNODES": "2"}, "RDZV_ENDPOINT"),
    (("t1-int4-130m-adam",), {"BATCH_SIZE": "48"}, "BATCH_SIZE=48"),
    (("t1-int4-130m-adam", "--lr", "1e-3"), {}, "LR="),
    (("t1-int4-130m-adam", "--seed=1"), {}, "SEED="),
    (("t1-int4-130m-adam", "--num_train", "5"), {}, "--num_train abbreviates --num_training_steps"),
    (("t1-int4-130m-adam", "--max_train_tokens=1B"), {}, "STEPS="),
    (("t1-int4-130m-adam", "--total_batch", "256"), {}, "512 x 256 tokens per update"),
    (("t1-int4-130m-adam", "--batch_size", "8"), {}, "BATCH_SIZE="),
    (("t1-int4-130m-adam", "--max_len=128"), {}, "--max_len abbreviates --max_length"),
    (("t1-int4-130m-adam", "--warmup_steps", "5"), {}, "WARMUP="),
    (("t1-int4-130m-stablespam", "--update_proj_gap", "500"), {}, "RESET="),
    (("t1-int4-130m-adam", "--save_dir", "x"), {}, "RUNS_DIR="),
    (("t1-int4-130m-adam", "--data", "sample"), {}, "--data abbreviates --dataset"),
    (("t1-int4-130m-adam", "--pack"), {}, "--pack abbreviates --packing"),
    (("t1-int4-130m-adam",), {"STEPS": "5", "WARMUP": "5"}, "warm-up 5 is not below the 5 updates"),
    (("t1-int4-130m-adam",), {"RESET": "500"}, "only spam and stablespam"),
    (("t1-int4-130m-adam",), {"SAVE_EVERY": "0"}, "SAVE_EVERY=0"),
])
def test_bad_settings_fail_with_one_line_naming_the_fix(argv, env, message):
    result = launch("launch.sh", *argv, **{"DRY_RUN": "1", "NGPU": "4", **env})
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_refused_prefixes_never_catch_a_real_flag():
    """launch.sh refuses every prefix of the flags it guards (before launching, where main_pretrain.py would refuse
    them after); a main_pretrain.py flag that is a strict prefix of a guarded one would be refused wrongly."""
    script = (PAPER / "launch.sh").read_text()
    guarded = [flag for name in ("REFUSED_FLAGS", "TAGGING_FLAGS")
               for flag in script.split(f"{name}=(")[1].split(")")[0].split()]
    real_flags = {flag for flag in build_parser()._option_string_actions if flag.startswith("--")}
    assert set(guarded) <= real_flags and len(guarded) == 16
    refused = set(guarded[:13])
    assert [(flag, full) for flag in real_flags - refused for full in guarded
            if flag != full and full.startswith(flag)] == []


def test_list_prints_every_cell():
    listed = launch("launch.sh", "--list").stdout.splitlines()[1:]
    assert [line.split()[0] for line in listed] == list(MANIFEST)


def test_without_dry_run_the_command_is_executed(tmp_path):
    """A stand-in torchrun on PATH records what it was given."""
    fake = tmp_path / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / "argv.txt"}\n')
    fake.chmod(0o755)
    result = launch("table2.sh", "stablespam", "60m", "--dataset", "sample",
                    NGPU="2", PATH=f"{tmp_path}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    received = (tmp_path / "argv.txt").read_text().splitlines()
    assert received == shlex.split(result.stdout.splitlines()[1])[1:]


def test_compile_passes_through_to_the_run():
    _, command = dry_run("launch.sh", "t1-int4-350m-stablespam", "--compile")
    assert main_pretrain_args(command, world_size=4).compile
    _, command = dry_run("launch.sh", "t1-int4-350m-stablespam")
    assert not main_pretrain_args(command, world_size=4).compile
