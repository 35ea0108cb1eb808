#!/usr/bin/env python3
"""Run a grid of main_pretrain.py runs (formats x optimizers x learning rates x seeds), one directory each.

    scripts/sweep.py --root runs/lr_sweep --optimizers adam,stablespam --formats bf16,int4,fp4 \\
        --lrs 1e-3,3e-3 --seeds 0,1,2 [--parallel 2] [--dry-run] -- --model_config configs/llama_9m.json ...

Flags after `--` go to every run. Re-running the same command is safe and is how a sweep is resumed: a run
whose metrics.jsonl has `final_eval_loss` is finished and skipped, and so is one that diverged (a non-finite
loss is a result, not a failure); a run with a checkpoint is continued from it (`--continue_from <run dir>
--restore_optimizer`, its metrics after that checkpoint dropped as they will be logged again); anything else
starts from scratch. Each run's output is appended to `<run dir>/sweep.log`.
Standard library only; the runs start with the Python that runs the sweep, unless --launcher says otherwise.
"""

import argparse
import itertools
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ENTRY_POINT = Path(__file__).resolve().parents[1] / "main_pretrain.py"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "sweep.log"
CHECKPOINT_PREFIX = "model_"
CHECKPOINT_DONE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete

# Numeric formats: the flags that select them (see README, "Simulated 4-bit training"). bf16 adds nothing:
# the dtype is a shared flag (pass --dtype bfloat16 after `--` for the papers' pure-bf16 setting).
FORMATS = {
    "bf16": [],
    "int4": ["--act_quant", "--weight_bits", "4", "--weight_group_size", "256"],
    "fp4": ["--fp4"],
    "mxfp4": ["--weight_format", "mxfp4", "--act_format", "mxfp4"],
    "nvfp4": ["--weight_format", "nvfp4", "--act_format", "nvfp4"],
}
# Optimizer presets; a name that is not here runs as `--optimizer NAME`.
OPTIMIZERS = {
    "adam": ["--optimizer", "adam"],
    "adam_clip": ["--optimizer", "adam", "--grad_clipping", "1.0"],
    "adafactor": ["--optimizer", "adafactor"],
    "spam": ["--optimizer", "spam", "--density", "1.0", "--threshold", "5000"],
    "spam_corrected": ["--optimizer", "spam", "--density", "1.0", "--threshold", "5000",
                       "--optimizer_variant", "corrected"],
    "stablespam": ["--optimizer", "stablespam"],
    "stablespam_corrected": ["--optimizer", "stablespam", "--optimizer_variant", "corrected"],
}
# The grid sets these per run; passing them after `--` would silently give every run the same value.
GRID_FLAGS = ("--lr", "--seed", "--optimizer", "--save_dir", "--continue_from", "--name")


@dataclass(frozen=True)
class Run:
    """One point of the grid and the command that trains it."""

    name: str
    directory: Path
    command: list[str]


def split_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{flag} {text!r}: give a comma-separated list, e.g. {flag} a,b")
    if len(set(items)) != len(items):
        raise ValueError(f"{flag} {text!r}: lists a value twice")
    return items


def parse_definitions(definitions: list[str], flag: str) -> dict[str, list[str]]:
    """`NAME=FLAGS` pairs (e.g. `stablespam4=--optimizer stablespam --gamma1 0.7`) -> {NAME: [flags]}."""
    parsed = {}
    for definition in definitions:
        name, sep, flags = definition.partition("=")
        if not sep or not name.strip() or "/" in name:
            raise ValueError(f"{flag} {definition!r}: write NAME=FLAGS, e.g. {flag} 'name=--flag value'")
        parsed[name.strip()] = shlex.split(flags)
    return parsed


def check_extra_flags(extra: list[str]) -> None:
    for token in extra:
        flag = token.split("=", 1)[0]
        if flag in GRID_FLAGS:
            raise ValueError(f"{flag} after `--`: the sweep sets it per run; use --lrs, --seeds, --optimizers "
                             "or --root instead")


def check_grid(format_names: list[str], formats: dict, optimizer_names: list[str], lrs: list[str],
               seeds: list[str]) -> None:
    for name in format_names:
        if name not in formats:
            raise ValueError(f"--formats: unknown format {name!r}; known: {', '.join(formats)} "
                             "(or define one with --define-format NAME=FLAGS)")
    for name in optimizer_names:
        if "/" in name:
            raise ValueError(f"--optimizers: {name!r} cannot name a run directory")
    for lr in lrs:
        try:
            value = float(lr)
        except ValueError:
            raise ValueError(f"--lrs: {lr!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"--lrs: {lr!r} must be positive")
    for seed in seeds:
        if not seed.isdigit():
            raise ValueError(f"--seeds: {seed!r} is not a non-negative integer")


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every grid point, in a stable order: format, optimizer, lr, seed."""
    formats = {**FORMATS, **parse_definitions(args.define_format, "--define-format")}
    optimizers = {**OPTIMIZERS, **parse_definitions(args.define_optimizer, "--define-optimizer")}
    grid = [split_list(args.formats, "--formats"), split_list(args.optimizers, "--optimizers"),
            split_list(args.lrs, "--lrs"), split_list(args.seeds, "--seeds")]
    check_grid(grid[0], formats, *grid[1:])
    check_extra_flags(args.extra)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    runs = []
    for format_name, optimizer_name, lr, seed in itertools.product(*grid):
        name = f"{format_name}-{optimizer_name}-lr{lr}-s{seed}"
        directory = Path(args.root) / name
        command = [*launcher, str(ENTRY_POINT), *formats[format_name],
                   *optimizers.get(optimizer_name, ["--optimizer", optimizer_name]), *args.extra,
                   "--lr", lr, "--seed", seed, "--save_dir", str(directory), "--name", name]
        runs.append(Run(name=name, directory=directory, command=command))
    return runs


def read_metrics(directory: Path) -> list[dict]:
    path = directory / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short when the run was killed
    return records


def latest_checkpoint(directory: Path) -> Path | None:
    steps = [int(child.name[len(CHECKPOINT_PREFIX):]) for child in directory.glob(f"{CHECKPOINT_PREFIX}*")
             if child.name[len(CHECKPOINT_PREFIX):].isdigit() and (child / CHECKPOINT_DONE_FILE).is_file()]
    return directory / f"{CHECKPOINT_PREFIX}{max(steps)}" if steps else None


def run_status(directory: Path) -> str:
    """finished | diverged | resume | new."""
    records = read_metrics(directory)
    if any("final_eval_loss" in record for record in records):
        return "finished"
    losses = [record["loss"] for record in records if "loss" in record]
    if losses and not math.isfinite(float(losses[-1])):
        return "diverged"
    return "resume" if latest_checkpoint(directory) is not None else "new"


def trim_metrics(directory: Path, checkpoint: Path) -> None:
    """Drop the records logged after the checkpoint a run resumes from: the resumed run logs those updates
    again, and one record per update keeps the curves and tables right."""
    update_step = json.loads((checkpoint / CHECKPOINT_DONE_FILE).read_text())["update_step"]
    kept = [record for record in read_metrics(directory) if record.get("step", 0) <= update_step]
    (directory / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in kept))


def command_for(run: Run, status: str) -> list[str]:
    if status == "resume":
        return [*run.command, "--continue_from", str(run.directory), "--restore_optimizer"]
    return run.command


def execute(run: Run, status: str, position: str) -> bool:
    """Train one run, its output appended to its sweep.log; True when it ended with a result."""
    run.directory.mkdir(parents=True, exist_ok=True)
    if status == "resume":
        trim_metrics(run.directory, latest_checkpoint(run.directory))
    command = command_for(run, status)
    print(f"{position} {status:8s} {run.name}", flush=True)
    started = time.monotonic()
    with (run.directory / LOG_FILE).open("a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    outcome = run_status(run.directory)
    seconds = time.monotonic() - started
    if returncode == 0 or outcome == "diverged":
        print(f"{position} {outcome:8s} {run.name} ({seconds:.0f} s)", flush=True)
        return True
    print(f"{position} FAILED   {run.name} (exit {returncode} after {seconds:.0f} s; see "
          f"{run.directory / LOG_FILE})", flush=True)
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --root DIR [grid options] [-- main_pretrain.py flags]")
    parser.add_argument("--root", required=True, help="directory holding one sub-directory per run")
    parser.add_argument("--formats", default="bf16", help=f"comma list; known: {', '.join(FORMATS)}")
    parser.add_argument("--optimizers", default="adam",
                        help=f"comma list; presets: {', '.join(OPTIMIZERS)}; other names run as --optimizer NAME")
    parser.add_argument("--lrs", default="1e-3", help="comma list of peak learning rates, e.g. 1e-3,3e-3")
    parser.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")
    parser.add_argument("--define-format", action="append", default=[], metavar="NAME=FLAGS",
                        help="add or replace a format, e.g. 'int4g64=--act_quant --weight_bits 4 "
                             "--weight_group_size 64'")
    parser.add_argument("--define-optimizer", action="append", default=[], metavar="NAME=FLAGS",
                        help="add or replace an optimizer preset, e.g. 'stablespam4bit=--optimizer stablespam "
                             "--gamma1 0.7 --gamma2 0.9'")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--launcher", default=None,
                        help="command before main_pretrain.py (default: this Python), e.g. "
                             "'torchrun --standalone --nproc_per_node 4'")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    args.extra = extra
    try:
        if args.parallel < 1:
            raise ValueError(f"--parallel {args.parallel}: must be at least 1")
        runs = plan_runs(args)
    except ValueError as err:
        parser.exit(2, f"sweep.py: error: {err}\n")

    statuses = [run_status(run.directory) for run in runs]
    counts = {status: statuses.count(status) for status in ("finished", "diverged", "resume", "new")}
    print(f"sweep: {len(runs)} runs under {args.root}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if args.dry_run:
        for run, status in zip(runs, statuses):
            print(f"{status:8s} {run.name}")
            if status in ("resume", "new"):
                print(f"         {shlex.join(command_for(run, status))}")
        return 0

    pending = [(run, status) for run, status in zip(runs, statuses) if status in ("resume", "new")]
    positions = [f"[{index}/{len(pending)}]" for index in range(1, len(pending) + 1)]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda job: execute(*job[0], job[1]), zip(pending, positions)))
    failed = results.count(False)
    print(f"sweep: {len(pending) - failed} ran, {failed} failed, {len(runs) - len(pending)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
