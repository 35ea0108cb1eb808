#!/usr/bin/env python3
"""Run a grid of main_pretrain.py runs (formats x optimizers x learning rates x seeds), one directory each.

    scripts/sweep.py --root runs/lr_sweep --optimizers adam,stablespam --formats bf16,int4,fp4 \\
        --lrs 1e-3,3e-3 --seeds 0,1,2 [--parallel 2] [--dry-run] -- --model_config configs/llama_9m.json ...

Flags after `--` go to every run. Re-running the same command is safe and is how a sweep is resumed: a run
whose metrics.jsonl has `final_eval_loss` is finished and skipped, and so is one that diverged (the trainer
stopped it and logged `diverged`, or a loss is non-finite: a result, not a failure, so it is not retried); a
run with a checkpoint is continued from it (`--continue_from <run dir> --restore_optimizer`; main_pretrain drops
its metrics after that checkpoint, as they are logged again); anything else starts from scratch. Each run's
output is appended to `<run dir>/sweep.log`.
The format and optimizer presets are scripts/presets.py's, shared with the paper launcher and the mini-paper.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from presets import (  # noqa: E402  (after the path fix)
    FORMATS,
    OPTIMIZERS,
    STABLESPAM_PRESETS,
    complete_checkpoints,
    optimizer_flags as preset_flags,
    recipe_of,
)

ENTRY_POINT = Path(__file__).resolve().parents[1] / "main_pretrain.py"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "sweep.log"
# The grid sets these per run; passing them after `--` would silently give every run the same value.
GRID_FLAGS = ("--lr", "--seed", "--optimizer", "--save_dir", "--continue_from", "--name")
# The sweep reads these after `--` (total_T follows the update count), so they must be spelled in full.
READ_FLAGS = ("--num_training_steps", "--max_train_tokens")


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
    """Refuse the grid's own flags, and abbreviations of every flag the sweep sets or reads: main_pretrain.py
    refuses `--se 3` too, but only once each run starts, while the sweep can say so before starting any."""
    for token in extra:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or flag == "--":
            continue
        if flag in GRID_FLAGS:
            raise ValueError(f"{flag} after `--`: the sweep sets it per run; use --lrs, --seeds, --optimizers "
                             "or --root instead")
        abbreviated = [full for full in GRID_FLAGS + READ_FLAGS if full != flag and full.startswith(flag)]
        if abbreviated:
            raise ValueError(f"{flag} after `--` abbreviates {abbreviated[0]}, which the sweep sets or reads; "
                             "spell flags out in full")


def flag_value(extra: list[str], flag: str) -> str | None:
    """The value the last `flag V` or `flag=V` in `extra` gives (argparse's last-wins), else None."""
    value = None
    for index, token in enumerate(extra):
        if token == flag and index + 1 < len(extra):
            value = extra[index + 1]
        elif token.startswith(f"{flag}="):
            value = token.split("=", 1)[1]
    return value


def update_count(extra: list[str]) -> str | None:
    """The runs' number of updates, when the flags after `--` fix it (--max_train_tokens overrides the count)."""
    if flag_value(extra, "--max_train_tokens") is not None:
        return None
    return flag_value(extra, "--num_training_steps")


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


def optimizer_flags(name: str, format_name: str, defined: dict[str, list[str]], updates: str | None) -> list[str]:
    """A user-defined preset as written, else a built-in one, else `--optimizer NAME`."""
    if name in defined:
        return defined[name]
    if name in OPTIMIZERS or name in STABLESPAM_PRESETS:
        return preset_flags(name, recipe=recipe_of(format_name), steps=updates)
    return ["--optimizer", name]


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every grid point, in a stable order: format, optimizer, lr, seed."""
    formats = {**FORMATS, **parse_definitions(args.define_format, "--define-format")}
    defined_optimizers = parse_definitions(args.define_optimizer, "--define-optimizer")
    grid = [split_list(args.formats, "--formats"), split_list(args.optimizers, "--optimizers"),
            split_list(args.lrs, "--lrs"), split_list(args.seeds, "--seeds")]
    check_grid(grid[0], formats, *grid[1:])
    check_extra_flags(args.extra)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    updates = update_count(args.extra)
    runs = []
    for format_name, optimizer_name, lr, seed in itertools.product(*grid):
        name = f"{format_name}-{optimizer_name}-lr{lr}-s{seed}"
        directory = Path(args.root) / name
        command = [*launcher, str(ENTRY_POINT), *formats[format_name],
                   *optimizer_flags(optimizer_name, format_name, defined_optimizers, updates), *args.extra,
                   "--lr", lr, "--seed", seed, "--save_dir", str(directory), "--name", name]
        runs.append(Run(name=name, directory=directory, command=command))
    return runs


def total_t_unknown(args: argparse.Namespace) -> bool:
    """A built-in Stable-SPAM preset is in the grid but the flags after `--` do not fix the update count."""
    defined = parse_definitions(args.define_optimizer, "--define-optimizer")
    presets = [name for name in split_list(args.optimizers, "--optimizers")
               if name in STABLESPAM_PRESETS and name not in defined]
    return bool(presets) and update_count(args.extra) is None


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


def run_status(directory: Path) -> str:
    """finished | diverged | resume | new. Diverged: the trainer's stop record, or a non-finite loss (logs from
    a trainer that did not skip non-finite updates)."""
    records = read_metrics(directory)
    if any("final_eval_loss" in record for record in records):
        return "finished"
    if any(record.get("diverged") is True for record in records):
        return "diverged"
    losses = [record["loss"] for record in records if "loss" in record]
    if losses and not math.isfinite(float(losses[-1])):
        return "diverged"
    return "resume" if complete_checkpoints(directory) else "new"


def command_for(run: Run, status: str) -> list[str]:
    if status == "resume":
        return [*run.command, "--continue_from", str(run.directory), "--restore_optimizer"]
    return run.command


def execute(run: Run, status: str, position: str) -> str:
    """Train one run, its output appended to its sweep.log; returns its outcome: a run_status, or "failed"."""
    run.directory.mkdir(parents=True, exist_ok=True)
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
        return outcome
    print(f"{position} FAILED   {run.name} (exit {returncode} after {seconds:.0f} s; see "
          f"{run.directory / LOG_FILE})", flush=True)
    return "failed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --root DIR [grid options] [-- main_pretrain.py flags]")
    parser.add_argument("--root", required=True, help="directory holding one sub-directory per run")
    parser.add_argument("--formats", default="bf16", help=f"comma list; known: {', '.join(FORMATS)}")
    parser.add_argument("--optimizers", default="adam",
                        help=f"comma list; presets: {', '.join([*OPTIMIZERS, *STABLESPAM_PRESETS])}; other names run "
                             "as --optimizer NAME")
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
    if total_t_unknown(args):
        print("sweep: note: the stablespam presets keep main_pretrain.py's --total_T 20000, as the update count "
              "is not known here; pass --num_training_steps (not --max_train_tokens) after `--` to set it")
    if args.dry_run:
        for run, status in zip(runs, statuses):
            print(f"{status:8s} {run.name}")
            if status in ("resume", "new"):
                print(f"         {shlex.join(command_for(run, status))}")
        return 0

    pending = [(run, status) for run, status in zip(runs, statuses) if status in ("resume", "new")]
    positions = [f"[{index}/{len(pending)}]" for index in range(1, len(pending) + 1)]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        outcomes = list(pool.map(lambda job: execute(*job[0], job[1]), zip(pending, positions)))
    failed = outcomes.count("failed")
    print(f"sweep: {len(pending) - failed} ran ({outcomes.count('diverged')} diverged), {failed} failed, "
          f"{len(runs) - len(pending)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
