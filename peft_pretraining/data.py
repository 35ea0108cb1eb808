"""Tokenizer and data: C4 streamed from the hub, the built-in sample, or local files, through one pipeline.

The reference (docs/algorithms.md#d6) streams `allenai/c4` `en`, shuffles it (seed 42, 1000-document buffer), splits it
across ranks with `split_dataset_by_node`, and makes one sequence per document: the T5 tokens truncated to
`max_length` with EOS kept, right-padded with the pad id. We keep that, and fix its data loss: the reference's
wrapper made each DataLoader worker keep only every `workers`-th document of the shards `datasets` had already
given it, discarding 15/16 of what it read. Here `datasets` alone splits the rank's shards among the workers, so
every document is used exactly once per epoch across ranks x workers (when the shard count is not a multiple of
the world size, `datasets` has every rank read all shards and keep every world_size-th document). Tokenisation
runs in the workers.

Local files (`.jsonl[.gz]`, `.json[.gz]`, `.parquet`, `.txt`, mixed freely) are read by one `datasets` generator
sharded by file, so they stream, shuffle and split across ranks and workers exactly as C4 does. It reads row by row
and never fails on a row: a row without a string `text` (missing, null, a number, a line that is not JSON) reaches
the loader as None, which skips and counts it. What cannot be read at all is refused before the run writes anything
(`preflight.check_documents`).
"""

import gzip
import itertools
import json
import os
import re
import socket
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import datasets
import huggingface_hub
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoTokenizer

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_TOKENIZER_DIR = DATA_DIR / "tokenizer"
SAMPLE_DIR = DATA_DIR / "sample"
C4_HUB_ID, C4_CONFIG = "allenai/c4", "en"
EVAL_SHUFFLE_BUFFER = 1000  # the `datasets` default the reference's eval stream used
HOLDOUT_EVERY = 100  # without a validation file, ~1 document in 100 is held out for evaluation
TOKENIZE_CHUNK = 64  # documents per tokenizer call: amortises the Python/Rust crossing
# Shards move between workers from pass to pass, so one pass may give a worker nothing; a worker whose share stays
# empty this many passes in a row (tiny or empty shards) stops instead of spinning, which would stall the loader.
MAX_EMPTY_PASSES = 100
STREAM_POSITION_KEY = "stream_position"  # where a tracked batch carries its worker's position
# Without a connection `datasets` and `transformers` retry for up to a minute before failing; this long a TCP connect
# to the hub tells first.
HUB_CONNECT_TIMEOUT = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Files one of which a cached hub tokenizer has.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json")

TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
# Longer suffixes first: "x.jsonl.gz" must not be taken for an unknown ".gz".
_BUILDER_BY_SUFFIX = {
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
_SUPPORTED = ", ".join(_BUILDER_BY_SUFFIX)
_VALIDATION_NAME = re.compile(r"(?:^|[/_.-])validation(?:[/_.-]|$)")


# ---------------------------------------------------------------------------------------------------- the hub


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used (an offline variable, or no connection within HUB_CONNECT_TIMEOUT
    seconds), or None when it can. Never takes longer than the timeout, even when DNS hangs."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]}"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    address = (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    connected = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=HUB_CONNECT_TIMEOUT).close()
            connected.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # a thread: the socket timeout does not bound DNS
    thread.start()
    thread.join(HUB_CONNECT_TIMEOUT)
    if connected:
        return None
    return f"no connection to {address[0]} within {HUB_CONNECT_TIMEOUT:g} s"


def _in_hub_cache(repo_id: str) -> bool:
    try:
        return any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, file), str) for file in _TOKENIZER_FILES)
    except ValueError:  # not a valid repo id: it cannot be cached
        return False


# ---------------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(name: str, max_length: int):
    """The tokenizer named by `--tokenizer`, with `pad_token_id` set.

    `builtin` is the 32k SentencePiece tokenizer shipped in `data/tokenizer` (no network; see data/NOTICE); a
    local directory is loaded from disk; anything else is a hub id (`t5-base`, the reference's), loaded like the
    reference with `model_max_length=max_length`; when the hub is unreachable (`hub_unreachable`) it comes from the
    local cache or not at all, at once. A tokenizer without a pad token pads with its unk token (else EOS): pads
    are told apart by the attention mask, not by their id.
    """
    cache_only = False
    if name == "builtin":
        location = str(BUILTIN_TOKENIZER_DIR)
        if not BUILTIN_TOKENIZER_DIR.is_dir():
            raise FileNotFoundError(f"--tokenizer builtin: {location} is missing; rebuild it with "
                                    "scripts/build_sample_corpus.py")
    elif Path(name).expanduser().exists():
        location = str(Path(name).expanduser())
        if not Path(location).is_dir():
            raise FileNotFoundError(f"--tokenizer {name}: not a directory; pass a directory holding "
                                    "tokenizer files, 'builtin', or a hub id such as t5-base")
    elif name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"--tokenizer {name}: no such directory")
    else:
        location = name
        unreachable = hub_unreachable()
        if unreachable is not None and not _in_hub_cache(name):
            raise FileNotFoundError(f"--tokenizer {name}: not in the local cache and the Hugging Face hub is "
                                    f"unreachable ({unreachable}); use --tokenizer builtin (no network) or a local "
                                    "directory")
        cache_only = unreachable is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, model_max_length=max_length, local_files_only=cache_only)
    except OSError as err:
        raise FileNotFoundError(f"--tokenizer {name}: cannot load it from the Hugging Face hub or its cache "
                                f"({type(err).__name__}); use --tokenizer builtin or a local directory") from err
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer {name}: it has no EOS token, which ends every sequence; pick another")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class DatasetSource:
    """Where documents come from: C4 on the hub, or local files.

    `builder` is "c4" or "files" (each file read by its suffix: `file_format`; a .txt file holds documents
    separated by blank lines).
    `holdout` is set when there is no validation file: a fixed ~1/HOLDOUT_EVERY of the training documents,
    chosen by a hash of their text (so independent of shards, ranks and workers), becomes the validation split
    and is left out of training. Evaluation then scans the training files for it: give a large corpus a
    `*validation*` file.
    """

    name: str
    builder: str
    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    holdout: bool = False


def resolve_dataset(name: str) -> DatasetSource:
    """`--dataset`: 'c4', 'sample' (the corpus in data/sample), or a file or directory of data files."""
    if name == "c4":
        return DatasetSource(name="c4", builder="c4")
    if name == "sample":
        if not SAMPLE_DIR.is_dir():
            raise FileNotFoundError(f"--dataset sample: {SAMPLE_DIR} is missing; rebuild it with "
                                    "scripts/build_sample_corpus.py")
        return _local_source("sample", SAMPLE_DIR)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(name, path)
    if "/" in name or "\\" in name or "." in name:
        raise FileNotFoundError(f"--dataset {name}: no such file or directory")
    raise ValueError(f"--dataset {name}: unknown dataset; use c4, sample, or a path to {_SUPPORTED} files")


def file_format(path: Path) -> str | None:
    """"json", "parquet" or "text" by the file's suffix; None for any other file."""
    lower = path.name.lower()
    return next((b for suffix, b in _BUILDER_BY_SUFFIX.items() if lower.endswith(suffix)), None)


def _local_source(name: str, path: Path) -> DatasetSource:
    if path.is_file():
        if file_format(path) is None:
            raise ValueError(f"--dataset {name}: unsupported file type; use one of {_SUPPORTED}")
        if path.stat().st_size == 0:
            raise ValueError(f"--dataset {name}: the file is empty")
        return DatasetSource(name=name, builder="files", train_files=(str(path.resolve()),), holdout=True)
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and file_format(p) and p.stat().st_size > 0
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"--dataset {name}: no non-empty {_SUPPORTED} files in this directory")
    is_validation = [bool(_VALIDATION_NAME.search(p.relative_to(path).as_posix().lower())) for p in files]
    train = tuple(str(p.resolve()) for p, v in zip(files, is_validation) if not v)
    validation = tuple(str(p.resolve()) for p, v in zip(files, is_validation) if v)
    if not train:
        raise ValueError(f"--dataset {name}: only validation files; add training files beside them")
    return DatasetSource(name=name, builder="files", train_files=train, validation_files=validation,
                         holdout=not validation)


def is_held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % HOLDOUT_EVERY == 0


def _keeps(example: dict, held_out: bool) -> bool:
    if example["text"] is None:
        return not held_out  # stays in training, where the loader counts it as skipped
    return is_held_out(example["text"]) == held_out


def open_text(path: str, errors: str = "replace"):
    """A data file as UTF-8 text, gunzipped by suffix. The loader replaces bytes that are not UTF-8 (U+FFFD):
    preflight has checked the head of the file strictly."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """The blank-line-separated paragraphs of a text file's lines: its documents."""
    kept = []
    for line in lines:
        line = line.rstrip("\n")
        if line:
            kept.append(line)
        elif kept:
            yield "\n".join(kept)
            kept = []
    if kept:
        yield "\n".join(kept)


def _paragraphs(path: str) -> Iterator[str]:
    with open_text(path) as file:
        yield from paragraphs(file)


def json_rows(lines: Iterator[str]) -> Iterator:
    """The rows of JSON lines, or of one JSON array when the first line opens one; a line that is not JSON gives
    None."""
    lines = (line for line in lines if line.strip())
    first = next(lines, None)
    if first is None:
        return
    if first.lstrip().startswith("["):
        try:
            rows = json.loads(first + "".join(lines))
        except ValueError:
            rows = None
        yield from rows if isinstance(rows, list) else [None]
        return
    for line in itertools.chain([first], lines):
        try:
            yield json.loads(line)
        except ValueError:
            yield None


def row_text(row) -> str | None:
    """The row's `text` if it is a string, else None (the row is skipped)."""
    text = row.get("text") if isinstance(row, dict) else None
    return text if isinstance(text, str) else None


def _json_texts(path: str) -> Iterator[str | None]:
    with open_text(path) as file:
        yield from map(row_text, json_rows(file))


def _parquet_texts(path: str) -> Iterator[str | None]:
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(columns=["text"]):
            yield from (text if isinstance(text, str) else None for text in batch.column(0).to_pylist())


_TEXTS_BY_FORMAT = {"json": _json_texts, "parquet": _parquet_texts, "text": _paragraphs}


def _file_rows(files: list[str]) -> Iterator[dict]:
    """{"text": str | None} for each row of `files`, in order (the generator `datasets` shards by file)."""
    for file in files:
        for text in _TEXTS_BY_FORMAT[file_format(Path(file))](file):
            yield {"text": text}


def load_documents(source: DatasetSource, split: str) -> datasets.IterableDataset:
    """The unshuffled, unsplit document stream of `split` ("train" or "validation"); a local row without a string
    `text` comes as None."""
    if source.builder == "c4":
        return datasets.load_dataset(C4_HUB_ID, C4_CONFIG, split=split, streaming=True)
    files = source.validation_files if split == "validation" and not source.holdout else source.train_files
    stream = datasets.IterableDataset.from_generator(_file_rows, features=TEXT_FEATURES,
                                                     gen_kwargs={"files": list(files)})
    if source.holdout:
        stream = stream.filter(partial(_keeps, held_out=split == "validation"))
    return stream


# ---------------------------------------------------------------------------------------------------- loaders


class TokenizedDocuments(IterableDataset):
    """One rank's documents, shuffled and tokenised inside the DataLoader workers.

    Each pass re-shuffles with seed `seed + epoch` (shard order and buffer); pass 0 is the reference's stream.
    In each worker `datasets` takes that worker's shards of the rank's share, so no document is read twice or
    thrown away. Without packing a document gives one sequence of at most `max_length` tokens ending in EOS
    (the T5 way); with packing, documents joined by EOS are cut into full rows of `max_length`.

    A row without text (None) is skipped; without packing, a document longer than `max_length` is cut. Both are
    counted per worker, over all passes ("skipped", "truncated" in the position), so the run can report them.

    With `track_position` every sequence comes with its worker's position after it: {"worker", "epoch",
    "documents" (taken from that pass), "row" (packing tokens carried over), "skipped", "truncated"}.
    `start_positions` (worker id -> position) makes each worker continue from there. `datasets`' own `state_dict()` cannot serve here: it drops
    the shuffle buffer's content, so a resumed shuffled stream would differ; the pass's consumed documents are
    instead skipped untokenised.
    """

    def __init__(self, documents: datasets.IterableDataset, tokenizer, *, max_length: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int, packing: bool, num_epochs: int | None,
                 track_position: bool = False, start_positions: dict[int, dict] | None = None):
        super().__init__()
        self.documents = documents
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.packing = packing
        self.num_epochs = num_epochs
        self.track_position = track_position
        self.start_positions = start_positions or {}

    def epoch_stream(self, epoch: int) -> datasets.IterableDataset:
        """This rank's share for one pass (a fresh dataset: `set_epoch` would share state across workers)."""
        stream = self.documents.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        if self.world_size > 1:
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        return stream

    def token_ids(self, first_epoch: int = 0, skip: int = 0) -> Iterator[tuple[int, int, list[int] | None]]:
        """(pass, documents taken from that pass so far, token ids) of each document from pass `first_epoch` on,
        after its first `skip` documents; no special tokens. Without packing the ids stop one token past
        `max_length - 1`, so a cut is visible; None for a row without text."""
        truncation = {} if self.packing else {"truncation": True, "max_length": self.max_length}
        epochs = itertools.count(first_epoch) if self.num_epochs is None else range(first_epoch, self.num_epochs)
        empty_passes = 0
        for epoch in epochs:
            taken = skip if epoch == first_epoch else 0
            documents = itertools.islice(self.epoch_stream(epoch), taken, None)
            empty_passes += 1
            while chunk := [example["text"] for example in itertools.islice(documents, TOKENIZE_CHUNK)]:
                texts = [text for text in chunk if text is not None]
                if texts:
                    empty_passes = 0
                    encoded = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False,
                                                  **truncation)["input_ids"])
                for text in chunk:
                    taken += 1
                    yield epoch, taken, None if text is None else next(encoded)
            if empty_passes == MAX_EMPTY_PASSES:
                return

    def sequences(self) -> Iterator[tuple[list[int], dict]]:
        """Each training sequence with this worker's position right after it."""
        worker = get_worker_info()
        worker_id = 0 if worker is None else worker.id
        start = self.start_positions.get(worker_id, {"epoch": 0, "documents": 0, "row": []})
        eos = self.tokenizer.eos_token_id
        row = list(start["row"])
        counts = {"skipped": start.get("skipped", 0), "truncated": start.get("truncated", 0)}
        for epoch, taken, ids in self.token_ids(start["epoch"], start["documents"]):
            if ids is None:
                counts["skipped"] += 1
                continue
            if not self.packing:
                if len(ids) >= self.max_length:
                    counts["truncated"] += 1
                    ids = ids[: self.max_length - 1]
                yield ids + [eos], {"worker": worker_id, "epoch": epoch, "documents": taken, "row": [], **counts}
                continue
            row += ids + [eos]
            while len(row) >= self.max_length:
                sequence, row = row[: self.max_length], row[self.max_length :]
                yield sequence, {"worker": worker_id, "epoch": epoch, "documents": taken, "row": list(row),
                                 **counts}

    def __iter__(self) -> Iterator:
        if self.track_position:
            return self.sequences()
        return (sequence for sequence, _ in self.sequences())


def pad_batch(sequences: list[list[int]], *, max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to `max_length` (fixed shapes, like the reference); attention_mask is 0 on pads."""
    input_ids = torch.full((len(sequences), max_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), max_length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_tracked_batch(items: list[tuple[list[int], dict]], *, max_length: int, pad_token_id: int) -> dict:
    """`pad_batch` of tracked sequences, plus the position after the batch's last one."""
    batch = pad_batch([sequence for sequence, _ in items], max_length=max_length, pad_token_id=pad_token_id)
    batch[STREAM_POSITION_KEY] = items[-1][1]
    return batch


def _single_threaded_tokenizer(worker_id: int) -> None:
    # Every worker would otherwise start a Rust thread pool the size of the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _check_loader_args(max_length: int, batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if max_length < 2:
        raise ValueError(f"--max_length {max_length}: must be at least 2 (a token and EOS)")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size}: must be at least 1")
    if num_workers < 0:
        raise ValueError(f"--workers {num_workers}: must be 0 or more")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")


def _effective_workers(dataset: TokenizedDocuments, num_workers: int) -> int:
    # A worker beyond the rank's shard count would get nothing from `datasets`.
    return min(num_workers, dataset.epoch_stream(0).num_shards)


def _dataloader(dataset: TokenizedDocuments, tokenizer, *, max_length: int, batch_size: int,
                num_workers: int) -> DataLoader:
    workers = _effective_workers(dataset, num_workers)
    collate = pad_tracked_batch if dataset.track_position else pad_batch
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=partial(collate, max_length=max_length, pad_token_id=tokenizer.pad_token_id),
        worker_init_fn=_single_threaded_tokenizer if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: starting an iterator (worker seeds) must not draw from the global RNG, which a
        # resumed run restores to the checkpoint's state and SPAM masks / stochastic rounding draw from.
        generator=torch.Generator().manual_seed(dataset.seed),
    )


def build_train_dataloader(source: DatasetSource, tokenizer, *, max_length: int, batch_size: int, rank: int,
                           world_size: int, num_workers: int, seed: int = 42, packing: bool = False,
                           shuffle_buffer: int = 1000, num_epochs: int | None = None) -> DataLoader:
    """Training batches {"input_ids", "attention_mask"}: LongTensor[batch_size, max_length] each.

    The stream repeats forever by default (`num_epochs=None`), each pass re-shuffled with seed + epoch, so a small
    corpus can be trained on for any number of steps; C4 is never exhausted in practice. For a run that
    checkpoints its position use `build_resumable_train_batches`.
    """
    _check_loader_args(max_length, batch_size, rank, world_size, num_workers)
    dataset = TokenizedDocuments(load_documents(source, "train"), tokenizer, max_length=max_length, rank=rank,
                                 world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, packing=packing,
                                 num_epochs=num_epochs)
    return _dataloader(dataset, tokenizer, max_length=max_length, batch_size=batch_size, num_workers=num_workers)


# Said once per run (ResumableBatches.notify), the counts at the end.
_DATA_NOTES = {
    "skipped": "rows without a string 'text' field (missing, null, a number, or a line that is not JSON) are "
               "skipped; the count is reported at the end",
    "truncated": "documents longer than --max_length {max_length} tokens are cut to it (the rest is not trained "
                 "on; --packing keeps every token); the count is reported at the end",
}


class ResumableBatches:
    """Training batches whose position can be saved and continued from exactly (with the same worker count).

    A DataLoader hands out batches from its workers in turn (0, 1, ..., N-1, 0, ...). Each batch carries its
    worker's position; this keeps the latest position per worker and whose turn is next. A fresh DataLoader
    always starts with worker 0, so a resumed one holds back at most N-1 batches to keep the saved turn order.
    A worker that stays silent while the others deliver more than N batches has run dry and leaves the turn.

    The positions also count the rows skipped and the documents cut (`data_counts`); `notify` is told once of
    each, when first seen: plain ints the workers send with each batch, so knowing costs no device sync.
    """

    def __init__(self, loader: DataLoader, state: dict | None = None,
                 notify: Callable[[str], None] | None = None):
        self.loader = loader
        self.num_workers = max(loader.num_workers, 1)
        self.positions: dict[int, dict] = dict(state["positions"]) if state else {}
        self.next_worker: int = state["next_worker"] if state else 0
        self.notify = notify
        self._noticed: set[str] = set()

    def data_counts(self) -> dict[str, int]:
        """Rows skipped for want of a string `text`, and documents cut to `max_length`, so far (this rank)."""
        return {f"documents_{kind}": sum(position.get(kind, 0) for position in self.positions.values())
                for kind in ("skipped", "truncated")}

    def _notice(self, position: dict) -> None:
        for kind in sorted(_DATA_NOTES.keys() - self._noticed):
            if position.get(kind, 0) > 0:
                self._noticed.add(kind)
                if self.notify is not None:
                    self.notify("note: " + _DATA_NOTES[kind].format(max_length=self.loader.dataset.max_length))

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "positions": dict(self.positions), "next_worker": self.next_worker}

    def __iter__(self) -> Iterator[dict]:
        waiting = {worker: deque() for worker in range(self.num_workers)}
        turns = list(range(self.num_workers))
        batches = iter(self.loader)
        while turns:
            turn = self.next_worker if self.next_worker in turns else turns[0]
            delivered_meanwhile = 0
            while not waiting[turn] and delivered_meanwhile <= self.num_workers:
                batch = next(batches, None)
                if batch is None:
                    turns = [worker for worker in turns if waiting[worker]]
                    break
                waiting[batch[STREAM_POSITION_KEY]["worker"]].append(batch)
                delivered_meanwhile += 1
            if not waiting[turn]:
                if turn in turns:
                    turns.remove(turn)  # ran dry: the DataLoader skips it too
                continue
            batch = waiting[turn].popleft()
            self.positions[turn] = batch.pop(STREAM_POSITION_KEY)
            self._notice(self.positions[turn])
            following = turns[(turns.index(turn) + 1) % len(turns)]
            self.next_worker = following
            yield batch


def build_resumable_train_batches(source: DatasetSource, tokenizer, *, max_length: int, batch_size: int,
                                  rank: int, world_size: int, num_workers: int, seed: int = 42,
                                  packing: bool = False, shuffle_buffer: int = 1000,
                                  state: dict | None = None, state_file: str = "",
                                  notify: Callable[[str], None] | None = None) -> ResumableBatches:
    """`build_train_dataloader`'s batches, continuing from `state` (a `ResumableBatches.state_dict()`, read from
    `state_file`) when given: no document the saved run consumed is trained on again. `notify` gets the one-time
    notes on skipped rows and cut documents."""
    _check_loader_args(max_length, batch_size, rank, world_size, num_workers)
    dataset = TokenizedDocuments(load_documents(source, "train"), tokenizer, max_length=max_length, rank=rank,
                                 world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, packing=packing,
                                 num_epochs=None, track_position=True,
                                 start_positions=state["positions"] if state else None)
    workers = max(_effective_workers(dataset, num_workers), 1)
    if state is not None and state["num_workers"] != workers:
        raise ValueError(f"{state_file}: the data position was saved with {state['num_workers']} DataLoader "
                         f"worker(s) per rank, this run has {workers}; resume with the same --workers")
    loader = _dataloader(dataset, tokenizer, max_length=max_length, batch_size=batch_size, num_workers=num_workers)
    return ResumableBatches(loader, state, notify)


def build_eval_dataloader(source: DatasetSource, tokenizer, *, max_length: int, batch_size: int, rank: int,
                          world_size: int, num_workers: int = 0, seed: int = 42) -> DataLoader:
    """Validation batches in the training format, one pass, one document per sequence (no packing).

    C4: its `validation` split. Local data: the files named `*validation*` (the sample's validation shard), or,
    if there are none, the ~1% of documents held out of training by a hash of their text. Shuffled with
    `seed` and a 1000-document buffer like the reference, then split across ranks.
    """
    _check_loader_args(max_length, batch_size, rank, world_size, num_workers)
    dataset = TokenizedDocuments(load_documents(source, "validation"), tokenizer, max_length=max_length, rank=rank,
                                 world_size=world_size, seed=seed, shuffle_buffer=EVAL_SHUFFLE_BUFFER, packing=False,
                                 num_epochs=1)
    return _dataloader(dataset, tokenizer, max_length=max_length, batch_size=batch_size, num_workers=num_workers)
