"""scripts/mini_paper.sh plans the grid the issue asks for, and every planned command parses."""

import os
import shlex
import subprocess
from collections import Counter
from pathlib import Path

from peft_pretraining.args import parse_args

REPO = Path(__file__).resolve().parents[1]


def planned_commands(tmp_path: Path) -> list[list[str]]:
    env = {**os.environ, "DRY_RUN": "1", "MINI_PAPER_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(REPO / "scripts" / "mini_paper.sh")], env=env, check=True,
                         capture_output=True, text=True).stdout
    commands = [shlex.split(line) for line in out.splitlines() if "main_pretrain.py" in line]
    return [command[2:] for command in commands]  # drop "python .../main_pretrain.py"


def test_the_plan_covers_optimizers_formats_seeds_the_lr_sweep_and_the_reset_runs(tmp_path):
    runs = {Path(args.save_dir).name: args for args in map(parse_args, planned_commands(tmp_path))}
    assert len(runs) == 5 * 3 * 3 + 2 * 3 + 2 * 3

    grid = Counter(name.rsplit("-lr", 1)[0] for name in runs if "-lr3e-3-" in name)
    for fmt in ("fp32", "int4", "fp4"):
        for optimizer in ("adam", "adam_clip", "spam", "stablespam", "stablespam_corrected"):
            assert grid[f"{fmt}-{optimizer}"] == 3, (fmt, optimizer)
    assert {name for name in runs if "-lr3e-3-" not in name} == {
        f"int4-{optimizer}-lr{lr}-s0" for optimizer in ("adam", "stablespam") for lr in ("1e-3", "1e-2", "3e-2")}

    fp32, int4, fp4 = runs["fp32-adam-lr3e-3-s0"], runs["int4-adam-lr3e-3-s0"], runs["fp4-adam-lr3e-3-s0"]
    assert not (fp32.act_quant or fp32.fp4) and int4.act_quant and not int4.act_stochastic and fp4.fp4
    assert int4.weight_bits == 4 and int4.weight_group_size == 256
    assert runs["fp32-adam_clip-lr3e-3-s1"].grad_clipping == 1.0 and fp32.grad_clipping == 0

    stable, corrected = runs["int4-stablespam-lr3e-3-s2"], runs["int4-stablespam_corrected-lr3e-3-s2"]
    assert (stable.gamma1, stable.gamma2, stable.gamma3) == (0.7, 0.9, 0.999)  # the papers' 4-bit recipe
    assert stable.total_T == stable.num_training_steps and stable.optimizer_variant == "reference"
    assert corrected.optimizer_variant == "corrected" and stable.update_proj_gap == 500
    assert runs["int4-stablespam_corrected_reset25-lr3e-3-s1"].update_proj_gap == 25
    assert runs["int4-stablespam_reset25-lr3e-3-s1"].optimizer_variant == "reference"
    assert {args.seed for args in runs.values()} == {0, 1, 2}


def test_finished_runs_are_skipped(tmp_path):
    finished = tmp_path / "runs" / "fp32-adam-lr3e-3-s0"
    finished.mkdir(parents=True)
    (finished / "metrics.jsonl").write_text('{"step": 100, "final_eval_loss": 6.5}\n')
    names = {Path(parse_args(argv).save_dir).name for argv in planned_commands(tmp_path)}
    assert len(names) == 5 * 3 * 3 + 2 * 3 + 2 * 3 - 1
    assert "fp32-adam-lr3e-3-s0" not in names and "fp32-adam-lr3e-3-s1" in names


def test_dry_run_flag_plans_into_runs_and_writes_nothing(tmp_path):
    """--dry-run (like the launchers) trains and writes nothing; only --publish targets the committed results."""
    env = {key: value for key, value in os.environ.items() if key not in ("DRY_RUN", "MINI_PAPER_DIR")}
    committed = {path: path.read_bytes() for path in (REPO / "docs" / "mini_paper").rglob("*") if path.is_file()}
    out_dir = REPO / "runs" / "mini_paper"
    existed = out_dir.exists()
    for extra, place in (([], out_dir), (["--publish"], REPO / "docs" / "mini_paper")):
        done = subprocess.run(["bash", str(REPO / "scripts" / "mini_paper.sh"), "--dry-run", *extra], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        save_dirs = {Path(parse_args(shlex.split(line)[2:]).save_dir).parent
                     for line in done.stdout.splitlines() if "main_pretrain.py" in line}
        assert save_dirs == {place / "runs"}
    assert out_dir.exists() == existed
    assert {path: path.read_bytes() for path in (REPO / "docs" / "mini_paper").rglob("*") if path.is_file()} == committed


def test_unknown_argument_is_refused_with_one_line():
    done = subprocess.run(["bash", str(REPO / "scripts" / "mini_paper.sh"), "--dryrun"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--dryrun" in done.stderr
