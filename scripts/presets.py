#!/usr/bin/env python3
"""The launchers' presets, one table for scripts/paper/launch.sh, scripts/sweep.py and scripts/mini_paper.sh:
numeric formats and the papers' optimizer recipes as main_pretrain.py flags, and the newest complete checkpoint
of a run. Standard library only (planning a run needs no torch); the bash launchers call it:

    python3 scripts/presets.py format int4
    python3 scripts/presets.py optimizer stablespam --format int4 --steps 20000 [--reset 500]
    python3 scripts/presets.py optimizer spam --spam-code stablespam_repo
    python3 scripts/presets.py newest-checkpoint RUN_DIR     # its step, or nothing

Flags print on one line, shell-quoted; a bad name or setting is one line on stderr and exit status 2.
"""

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peft_pretraining.checkpoint_layout import complete_checkpoints  # noqa: E402  (after the path fix)

# Numeric formats: the flags that select them. int4 and fp4 are what the reference effectively ran (W4A4 INT
# and its "fp4", with the reference's kept outliers); int4 spells its group size out so that the run
# records it (it is quantization.REFERENCE_GROUP_SIZE, which a test checks). bf16 and fp32 add nothing, the
# dtype is a run flag (they name the run).
FORMATS = {
    "bf16": [],
    "fp32": [],
    "int4": ["--act_quant", "--weight_bits", "4", "--weight_group_size", "256"],
    "fp4": ["--fp4"],
    "mxfp4": ["--weight_format", "mxfp4", "--act_format", "mxfp4"],
    "nvfp4": ["--weight_format", "nvfp4", "--act_format", "nvfp4"],
}
FOUR_BIT_FORMATS = ("int4", "fp4", "mxfp4", "nvfp4")

# Optimizer presets whose flags do not depend on the run.
OPTIMIZERS = {
    "adam": ["--optimizer", "adam"],
    "adam_clip": ["--optimizer", "adam", "--grad_clipping", "1.0"],
    "adafactor": ["--optimizer", "adafactor"],
    "spam": ["--optimizer", "spam", "--density", "1.0"],
    "spam_corrected": ["--optimizer", "spam", "--density", "1.0", "--optimizer_variant", "corrected"],
}
# Stable-SPAM presets follow the papers' recipe (Tables 6/7): gammas per precision, a momentum reset every 1000
# updates, total_T = the run's update count; the value is the variant's flags.
STABLESPAM_PRESETS = {"stablespam": [], "stablespam_corrected": ["--optimizer_variant", "corrected"]}
STABLESPAM_GAMMAS = {"4bit": ("0.7", "0.9", "0.999"), "bf16": ("0.85", "0.99999", "0.999")}
STABLESPAM_RESET_INTERVAL = "1000"
# SPAM's spike threshold and post-reset warm-up as each code base ran them: the SPAM paper's code (threshold
# 5000; it passed the lr warm-up as the post-reset warm-up) and the StableSPAM repo's SPAM, which has no flag
# for either and used its constructor defaults (2000 and 150).
SPAM_CODES = {"spam_repo": "5000", "stablespam_repo": "2000"}
STABLESPAM_REPO_SPAM_WARMUP = "150"


def format_flags(name: str) -> list[str]:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return list(FORMATS[name])


def recipe_of(format_name: str) -> str:
    """The Stable-SPAM recipe of a format: the 4-bit one for the 4-bit formats, the BF16 one otherwise."""
    return "4bit" if format_name in FOUR_BIT_FORMATS else "bf16"


def optimizer_flags(name: str, *, recipe: str = "bf16", steps: str | None = None, reset: str | None = None,
                    spam_code: str = "spam_repo", lr_warmup: str | None = None) -> list[str]:
    """A preset's flags. `recipe` (4bit, bf16) picks Stable-SPAM's gammas; `steps` sets its total_T when known;
    `reset` replaces the momentum-reset interval (spam and stablespam only); `spam_code` and `lr_warmup` decide
    SPAM's threshold and post-reset warm-up (see SPAM_CODES)."""
    if name not in OPTIMIZERS and name not in STABLESPAM_PRESETS:
        raise ValueError(f"unknown optimizer preset {name!r}; known: {', '.join([*OPTIMIZERS, *STABLESPAM_PRESETS])}")
    resets = name.startswith("spam") or name in STABLESPAM_PRESETS
    if reset is not None and not resets:
        raise ValueError(f"reset {reset}: only spam and stablespam reset their momentum, not {name}")
    if name in STABLESPAM_PRESETS:
        gamma1, gamma2, gamma3 = STABLESPAM_GAMMAS[recipe]
        flags = ["--optimizer", "stablespam", "--gamma1", gamma1, "--gamma2", gamma2, "--gamma3", gamma3,
                 "--update_proj_gap", reset or STABLESPAM_RESET_INTERVAL]
        return flags + (["--total_T", steps] if steps is not None else []) + STABLESPAM_PRESETS[name]
    flags = list(OPTIMIZERS[name])
    if name.startswith("spam"):
        warmup = STABLESPAM_REPO_SPAM_WARMUP if spam_code == "stablespam_repo" else lr_warmup
        flags += ["--threshold", SPAM_CODES[spam_code]] + (["--warmup_epoch", warmup] if warmup else [])
        flags += ["--update_proj_gap", reset] if reset is not None else []
    return flags


def newest_checkpoint(run_dir: str) -> str:
    """The step of the newest complete checkpoint in `run_dir`, or "" when there is none."""
    steps = list(complete_checkpoints(run_dir))
    return str(steps[-1]) if steps else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="presets.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("format", help="a format's flags").add_argument("name", help=", ".join(FORMATS))
    optimizer = commands.add_parser("optimizer", help="an optimizer preset's flags", allow_abbrev=False)
    optimizer.add_argument("name", help=", ".join([*OPTIMIZERS, *STABLESPAM_PRESETS]))
    optimizer.add_argument("--format", choices=tuple(FORMATS), default=None,
                           help="the run's format, which picks the recipe (4-bit formats: 4bit, others: bf16)")
    optimizer.add_argument("--recipe", choices=tuple(STABLESPAM_GAMMAS), default=None,
                           help="Stable-SPAM's gammas whatever the format")
    optimizer.add_argument("--steps", help="the run's update count (Stable-SPAM's total_T)")
    optimizer.add_argument("--reset", help="momentum-reset interval (spam, stablespam)")
    optimizer.add_argument("--spam-code", choices=tuple(SPAM_CODES), default="spam_repo",
                           help="whose SPAM threshold and warm-up (default spam_repo)")
    optimizer.add_argument("--lr-warmup", help="with spam_repo: the lr warm-up, passed as SPAM's warm-up")
    newest = commands.add_parser("newest-checkpoint", help="step of a run's newest complete checkpoint, or nothing")
    newest.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "format":
            print(shlex.join(format_flags(args.name)))
        elif args.command == "optimizer":
            recipe = args.recipe or recipe_of(args.format or "bf16")
            print(shlex.join(optimizer_flags(args.name, recipe=recipe, steps=args.steps, reset=args.reset,
                                             spam_code=args.spam_code, lr_warmup=args.lr_warmup)))
        else:
            print(newest_checkpoint(args.run_dir))
    except ValueError as err:
        parser.exit(2, f"presets.py: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
