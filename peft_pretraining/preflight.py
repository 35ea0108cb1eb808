"""Checks of a run's files and directories, made before the run writes anything.

A start that fails must leave an existing `--save_dir` as it was (run_config.json, metrics.jsonl, checkpoints),
so whatever can reject user input runs before `pretrain` writes the run record. The flags alone are checked in
`args`; the model config and the tokenizer's vocabulary in `model`, the data path in `data` (all before the first
write too). Here is what needs the filesystem and would otherwise surface only after the first write, or as a
traceback: the save directory, the checkpoint to resume, and the data files' `text` field.
"""

import argparse
import os
from pathlib import Path

from peft_pretraining.checkpoint import find_checkpoint
from peft_pretraining.data import DatasetSource, load_documents


def check_run_inputs(args: argparse.Namespace, source: DatasetSource) -> None:
    """Raise ValueError/FileNotFoundError naming the flag and the fix for the first unusable input."""
    check_save_dir(args.save_dir)
    check_resume_source(args.continue_from, args.resume_step)
    check_documents(source)


def check_save_dir(save_dir: str) -> None:
    """The run can create `save_dir` or write into it: nothing but directories on the way, and write access."""
    path = Path(save_dir)
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--save_dir {save_dir}: {existing} is in the way (a file, not a directory); "
                         "move it or pick another --save_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--save_dir {save_dir}: {existing} is not writable; pick a directory you can write to")


def check_resume_source(continue_from: str | None, resume_step: int | None) -> None:
    """`--continue_from` is a directory holding a complete checkpoint (the one `--resume_step` asks for)."""
    if continue_from is None:
        return
    path = Path(continue_from)
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such directory"
        raise FileNotFoundError(f"--continue_from {continue_from}: {problem}; pass the --save_dir of the run "
                                "to resume")
    find_checkpoint(path, resume_step)


def check_documents(source: DatasetSource) -> None:
    """Local data files open and have a `text` field (the data loader would find out only after the first write).

    C4 is skipped: its fields are known and asking the hub costs a network round trip. `datasets` reads only the
    start of the first file to learn the fields, so a file malformed elsewhere still fails later, in a data-loader
    worker.
    """
    if source.builder == "c4":
        return
    for split in ("train", "validation") if source.validation_files else ("train",):
        try:
            load_documents(source, split)
        except OSError as err:
            raise ValueError(f"--dataset {source.name}: cannot read its {split} files ({err}); "
                             "fix or remove the file") from None
