"""Checks of a run's files and directories, made before the run writes anything.

A start that fails must leave an existing `--save_dir` as it was (run_config.json, metrics.jsonl, checkpoints),
so whatever can reject user input runs before `pretrain` writes the run record. The flags alone are checked in
`args`; the model config and the tokenizer's vocabulary in `model`, the data path in `data` (all before the first
write too). Here is what needs the filesystem and would otherwise surface only after the first write, or as a
traceback: the wandb key, the save directory, the checkpoint to resume, the data files (readable, with a `text`
field) and, for C4, the hub.
"""

import argparse
import io
import itertools
import netrc
import os
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from peft_pretraining.checkpoint import find_checkpoint
from peft_pretraining.data import (
    DatasetSource,
    file_format,
    hub_unreachable,
    is_held_out,
    json_rows,
    open_text,
    paragraphs,
    row_text,
)
from peft_pretraining.metrics import wandb_wanted

# How much of each data file preflight reads: enough to tell a wrong or binary file, bounded for huge corpora.
HEAD_BYTES = 1 << 20
HEAD_ROWS = 1000


def check_run_inputs(args: argparse.Namespace, source: DatasetSource) -> None:
    """Raise ValueError/FileNotFoundError naming the flag and the fix for the first unusable input."""
    check_wandb_key(args.unset_wandb)
    check_save_dir(args.save_dir)
    check_resume_source(args.continue_from, args.resume_step)
    check_documents(source)


def check_wandb_key(unset_wandb: bool) -> None:
    """Online wandb needs an API key; look where wandb does (WANDB_API_KEY, an identity token file, the netrc
    entry of its host) without asking the network, so a run without one fails now, not after its first writes."""
    if not wandb_wanted(unset_wandb) or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    if _netrc_has(host):
        return
    raise ValueError("wandb has no API key (WANDB_API_KEY or `wandb login`): pass --unset_wandb for no wandb, or set "
                     "WANDB_MODE=offline to log locally and `wandb sync` later")


def _netrc_has(host: str) -> bool:
    """Whether the netrc file wandb reads ($NETRC, else ~/.netrc, else ~/_netrc) has credentials for `host`."""
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if path.is_file():
            try:
                return netrc.netrc(path).authenticators(host) is not None
            except (netrc.NetrcParseError, OSError):
                return False
    return False


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
    """Every local data file reads as its format and has rows with a string `text`, judged on its head (the first
    HEAD_BYTES bytes, HEAD_ROWS rows): a bounded read, however large the corpus, that catches a wrong or binary
    file before the first write instead of in a data-loader worker. Past the head, rows without text are skipped
    and counted, and bytes that are not UTF-8 become U+FFFD. With a held-out split, some of the sampled
    documents must stay for training.

    C4 needs the hub, which is tested for in a few seconds (not a minute of retries); its fields are known.
    """
    if source.builder == "c4":
        unreachable = hub_unreachable()
        if unreachable is not None:
            raise ValueError(f"--dataset c4 streams allenai/c4 from the Hugging Face hub, which is unreachable "
                             f"({unreachable}); use --dataset sample (built in) or a path to your own files")
        return
    training_text = False
    for file in source.train_files + source.validation_files:
        texts = [text for text in _head_texts(file, source.name) if text is not None]
        if not texts and file_format(Path(file)) == "text":
            raise ValueError(f"--dataset {source.name}: {file} holds no text, only blank lines; fill or remove it")
        if not texts:
            raise ValueError(f"--dataset {source.name}: {file} has no row with a string 'text' field among its first "
                             f"{HEAD_ROWS}; give each document a 'text' field (or remove the file)")
        if file in source.train_files and not (source.holdout and all(map(is_held_out, texts))):
            training_text = True
    if not training_text:
        raise ValueError(f"--dataset {source.name}: every document falls in the ~1% held out for evaluation; add "
                         "documents, or a file named *validation* for evaluation")


def _head_texts(file: str, name: str) -> list[str | None]:
    """The texts of the file's first rows as the loader reads them (None: no string text); a ValueError naming the
    file if it cannot be read as its format."""
    kind = file_format(Path(file))
    try:
        if kind == "parquet":
            return _parquet_head_texts(file, name)
        with open_text(file, errors="strict") as opened:
            head = opened.read(HEAD_BYTES)
            whole = not opened.read(1)
    except UnicodeDecodeError:
        raise ValueError(f"--dataset {name}: {file} is not UTF-8 text (a binary file?); convert it to UTF-8 or "
                         "remove it") from None
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"--dataset {name}: cannot read {file} ({err}); fix or remove the file") from None
    lines = io.StringIO(head).readlines()
    if not whole:
        lines = lines[:-1]  # cut at HEAD_BYTES: not a whole row
    rows = paragraphs(lines) if kind == "text" else map(row_text, json_rows(iter(lines)))
    return list(itertools.islice(rows, HEAD_ROWS))


def _parquet_head_texts(file: str, name: str) -> list[str | None]:
    try:
        with pq.ParquetFile(file) as parquet:
            schema = parquet.schema_arrow
            if "text" not in schema.names:
                raise ValueError(f"--dataset {name}: {file} has no 'text' column (found {schema.names}); name the "
                                 "documents' column 'text'")
            text_type = schema.field("text").type
            if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
                raise ValueError(f"--dataset {name}: {file}: its 'text' column holds {text_type}, not strings; "
                                 "store the documents as strings")
            first = next(parquet.iter_batches(batch_size=HEAD_ROWS, columns=["text"]), None)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"--dataset {name}: cannot read {file} as Parquet ({err}); fix or remove the file") from None
    return [] if first is None else [text if isinstance(text, str) else None for text in first.column(0).to_pylist()]
