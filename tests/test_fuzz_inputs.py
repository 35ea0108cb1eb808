"""Property-based tests of what a user feeds the run: data files and flags.

Whatever the data files hold, the run either trains or stops with one line naming the file, before writing
anything; whatever flags are given, parsing and validation either succeed or say what is wrong in one line.
Data is fuzzed in-process through preflight and the real loader (a training run per example would take too
long); a few real `main_pretrain.py` runs check the same from the outside.
"""

import contextlib
import gzip
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_pretraining.args import build_parser, flag_warnings, parse_args, resolve_batch_arithmetic
from peft_pretraining.data import (
    build_eval_dataloader,
    build_resumable_train_batches,
    load_tokenizer,
    resolve_dataset,
)
from peft_pretraining.preflight import check_documents

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
MAX_LENGTH = 16

# ---------------------------------------------------------------------------------------------------- data files

words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
json_values = st.one_of(words, st.integers(), st.none(), st.booleans(), st.lists(words, max_size=2))
rows = st.one_of(st.fixed_dictionaries({"text": words}),
                 st.dictionaries(st.sampled_from(["text", "content", "id"]), json_values, max_size=3))


@st.composite
def file_bytes(draw, suffix: str) -> bytes:
    """The content of a data file named `*suffix`: right, wrong, empty, binary, huge or in another encoding."""
    kind = draw(st.sampled_from(["rows", "rows", "rows", "rows", "bytes", "empty", "huge_line", "other_encoding"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "empty":
        return b""
    if kind == "huge_line":
        texts = ["word " * 40_000]
    elif kind == "other_encoding":
        text = draw(words.filter(lambda t: t.strip()))
        encoding = draw(st.sampled_from(["utf-16", "latin-1", "cp1252"]))
        return text.encode(encoding, errors="replace")
    else:
        texts = None
    table = [{"text": text} for text in texts] if texts else draw(st.lists(rows, min_size=1, max_size=8))
    if suffix == ".parquet":
        columns = {key: [row.get(key) for row in table] for key in {key for row in table for key in row}}
        try:
            sink = io.BytesIO()
            pq.write_table(pa.table(columns or {"id": [1]}), sink)
        except (pa.ArrowException, ValueError, TypeError):  # columns of mixed types: write what pyarrow can
            sink = io.BytesIO()
            pq.write_table(pa.table({"text": [str(row.get("text")) for row in table]}), sink)
        return sink.getvalue()
    if suffix == ".txt":
        content = "\n\n".join(str(row.get("text", "")) for row in table).encode()
    else:
        content = "".join(json.dumps(row) + "\n" for row in table).encode()
    return gzip.compress(content) if suffix.endswith(".gz") and draw(st.booleans()) else content


@st.composite
def corpora(draw) -> dict[str, bytes]:
    """1-3 files (name -> bytes), maybe with a validation file among them."""
    files = {}
    for index in range(draw(st.integers(1, 3))):
        suffix = draw(st.sampled_from(SUFFIXES))
        stem = "validation" if index > 0 and draw(st.booleans()) else f"train-{index}"
        files[f"{stem}{suffix}"] = draw(file_bytes(suffix))
    return files


def write_corpus(directory: Path, files: dict[str, bytes]) -> Path:
    corpus = directory / "corpus"
    corpus.mkdir()
    for name, content in files.items():
        (corpus / name).write_bytes(content)
    return corpus


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin", max_length=MAX_LENGTH)


@settings(FUZZ, max_examples=40)
@given(files=corpora())
def test_any_corpus_is_refused_in_one_line_or_read(tokenizer, files):
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp), files)
        try:
            source = resolve_dataset(str(corpus))
            check_documents(source)
        except (ValueError, FileNotFoundError) as err:
            message = str(err)
            assert message.startswith(f"--dataset {corpus}") and "\n" not in message
            return
        batches = build_resumable_train_batches(source, tokenizer, max_length=MAX_LENGTH, batch_size=2, rank=0,
                                                world_size=1, num_workers=0)
        first = list(itertools.islice(batches, 3))
        assert len(first) == 3 and all(batch["input_ids"].shape == (2, MAX_LENGTH) for batch in first)
        evaluation = build_eval_dataloader(source, tokenizer, max_length=MAX_LENGTH, batch_size=2, rank=0,
                                           world_size=1)
        assert all(batch["input_ids"].shape[1] == MAX_LENGTH for batch in evaluation)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in root.rglob("*")}


@pytest.mark.parametrize("files, trains", [
    pytest.param({"a.txt": bytes(range(256)) * 64, "b.jsonl": b'{"text": "fine"}\n'}, False, id="binary-txt"),
    pytest.param({"a.jsonl.gz": gzip.compress(b"\x00\xff" * 500)}, False, id="binary-jsonl-gz"),
    pytest.param({"a.txt": b"one paragraph\n\nanother one\n", "b.jsonl": b'{"text": 5}\n{"x": 1}\n{"text": "ok"}\n',
                  "c.parquet": None, "d.jsonl": ("{\"text\": \"%s\"}\n" % ("long " * 5000)).encode()}, True,
                 id="mixed-formats-bad-rows-huge-line"),
])
def test_main_pretrain_trains_or_exits_2_with_one_line_and_an_untouched_save_dir(tiny_config, tmp_path, files,
                                                                                  trains):
    if "c.parquet" in files:
        sink = io.BytesIO()
        pq.write_table(pa.table({"text": ["from parquet", None]}), sink)
        files = {**files, "c.parquet": sink.getvalue()}
    corpus = write_corpus(tmp_path, files)
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # an earlier run's
    before = snapshot(save_dir)
    argv = ["--model_config", str(tiny_config), "--dataset", str(corpus), "--tokenizer", "builtin", "--batch_size",
            "2", "--max_length", "16", "--num_training_steps", "2", "--warmup_steps", "1", "--eval_every", "2",
            "--eval_tokens", "64", "--workers", "0", "--unset_wandb", "--save_dir", str(save_dir)]
    done = subprocess.run([sys.executable, str(REPO / "main_pretrain.py"), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **OFFLINE_ENV})
    if trains:
        assert done.returncode == 0, done.stderr
        final = json.loads((save_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert final["documents_skipped"] >= 0 and "final_eval_loss" in final
    else:
        assert done.returncode == 2 and "Traceback" not in done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "--dataset" in lines[0] and "a." in lines[0], done.stderr
        assert snapshot(save_dir) == before


# ---------------------------------------------------------------------------------------------------- flags

_ACTIONS = [action for action in build_parser()._actions if action.option_strings != ["-h", "--help"]]
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8)


def _values(action) -> st.SearchStrategy[str]:
    """Values for one flag: its choices, numbers of its type (edge cases included), or any text."""
    if action.choices:
        return st.one_of(st.sampled_from(list(action.choices)), _TEXT)
    if action.type is int:
        return st.one_of(st.integers(-3, 5).map(str), st.integers(-(10**12), 10**12).map(str), _TEXT)
    if action.type is float:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.sampled_from(["0", "1", "-1", "0.5", "1e-3", "nan", "inf"]), _TEXT)
    return st.one_of(st.sampled_from(["0", "10M", "2B", "adam", "stablespam", "cosine", "sample"]), _TEXT)


@st.composite
def command_lines(draw) -> list[str]:
    """Required flags most of the time, plus 0-8 flags from the parser's own table with drawn values."""
    argv = []
    if draw(st.booleans()) or draw(st.booleans()):
        argv += ["--model_config", "configs/llama_9m.json", "--batch_size", draw(st.sampled_from(["1", "4", "0"]))]
    for action in draw(st.lists(st.sampled_from(_ACTIONS), max_size=8)):
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        elif draw(st.booleans()):
            argv += [flag, draw(_values(action))]
        else:
            argv.append(f"{flag}={draw(_values(action))}")
    return argv


@settings(FUZZ, max_examples=150)
@given(argv=command_lines(), world_size=st.sampled_from([1, 2, 3, 8]))
def test_any_command_line_parses_or_fails_in_one_line(argv, world_size):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parse_args(argv)
        resolve_batch_arithmetic(args, world_size)
        flag_warnings(args, argv)
    except SystemExit as exit_:
        assert exit_.code == 2 and stderr.getvalue().count("\n") == 1, stderr.getvalue()
        assert stderr.getvalue().startswith("main_pretrain.py: error: ")
    except ValueError as err:
        assert "\n" not in str(err) and "--" in str(err), str(err)
