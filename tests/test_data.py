"""Data pipeline: the built-in tokenizer and sample, local sources, sharding across ranks x workers, batches."""

import collections
import itertools
import gzip
import json
import os
import signal
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node

from peft_pretraining import data
from peft_pretraining.data import (
    BUILTIN_TOKENIZER_DIR,
    SAMPLE_DIR,
    build_eval_dataloader,
    build_resumable_train_batches,
    build_train_dataloader,
    load_documents,
    load_tokenizer,
    resolve_dataset,
)
from peft_pretraining.preflight import check_documents

ENGLISH = "In the beginning God created the heavens and the earth. To be, or not to be: that is the question."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin", max_length=64)


def write_jsonl(path, texts, compress=False):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")


def make_corpus(tmp_path, num_shards, docs_per_shard=10):
    """Shards of documents with unique ids in their text, plus a one-document validation file."""
    docs = []
    for shard in range(num_shards):
        texts = [f"document {shard:02d}-{i:02d} about nothing much" for i in range(docs_per_shard)]
        write_jsonl(tmp_path / f"train-{shard:05d}.jsonl.gz", texts, compress=True)
        docs += texts
    write_jsonl(tmp_path / "validation-00000.jsonl", ["held out"])
    return resolve_dataset(str(tmp_path)), docs


def decoded_rows(loader, tokenizer):
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for batch in loader
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_builtin_tokenizer_encodes_english_like_its_sentencepiece_model(tokenizer):
    assert len(tokenizer) == 32000
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 0)
    ids = tokenizer(ENGLISH)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:4] == ["▁In", "▁the", "▁beginning", "▁God"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in ids  # T5-like: EOS, no BOS
    sp = spm.SentencePieceProcessor(model_file=str(BUILTIN_TOKENIZER_DIR / "tokenizer.model"))
    assert ids[:-1] == sp.encode(ENGLISH)
    assert tokenizer.decode(ids, skip_special_tokens=True) == ENGLISH


def test_builtin_tokenizer_round_trips_sample_text(tokenizer):
    with gzip.open(SAMPLE_DIR / "validation-00000-of-00001.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(5))]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        assert 0 not in ids  # byte fallback: no unknown tokens
        assert len(text) / len(ids) > 2.5  # whole words, not characters or bytes (~3.4 characters per token)
        assert tokenizer.decode(ids) == text


def test_builtin_tokenizer_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tokenizer = load_tokenizer("builtin", max_length=128)
    assert tokenizer.model_max_length == 128
    assert tokenizer.decode(tokenizer(ENGLISH)["input_ids"], skip_special_tokens=True) == ENGLISH


def test_tokenizer_from_a_directory_and_missing_paths(tmp_path):
    tokenizer = load_tokenizer(str(BUILTIN_TOKENIZER_DIR), max_length=32)
    assert len(tokenizer) == 32000 and tokenizer.pad_token_id == 0
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"--tokenizer {missing}"):
        load_tokenizer(str(missing), max_length=32)
    a_file = tmp_path / "tokenizer.model"
    a_file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(str(a_file), max_length=32)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 to fail without network")
def test_unreachable_hub_tokenizer_is_a_one_line_error():
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer("no-such-user/no-such-tokenizer", max_length=32)
    message = str(info.value)
    assert message.startswith("--tokenizer no-such-user/no-such-tokenizer:") and "builtin" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------- sources


def test_c4_streams_the_reference_dataset_through_the_same_pipeline(tmp_path, tokenizer, monkeypatch):
    texts = [f"c4 document {i}" for i in range(12)]
    write_jsonl(tmp_path / "c4.jsonl", texts)
    calls = []

    def fake_hub(path, *args, **kwargs):  # C4 itself needs the network: serve a local file in its place
        calls.append((path, args, kwargs))
        return load_dataset("json", data_files=str(tmp_path / "c4.jsonl"), split="train", streaming=True)

    monkeypatch.setattr(data.datasets, "load_dataset", fake_hub)
    source = resolve_dataset("c4")
    train = build_train_dataloader(source, tokenizer, max_length=16, batch_size=4, rank=0, world_size=1,
                                   num_workers=0, num_epochs=1)
    evaluation = build_eval_dataloader(source, tokenizer, max_length=16, batch_size=4, rank=0, world_size=1)
    assert sorted(decoded_rows(train, tokenizer)) == sorted(decoded_rows(evaluation, tokenizer)) == sorted(texts)
    assert calls == [
        ("allenai/c4", ("en",), {"split": "train", "streaming": True}),
        ("allenai/c4", ("en",), {"split": "validation", "streaming": True}),
    ]


def test_jsonl_gz_parquet_and_txt_give_the_same_documents(tmp_path):
    texts = [f"Document {i}: naïve café,\nsecond line {i * i}." for i in range(300)]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    write_jsonl(tmp_path / "docs.jsonl.gz", texts, compress=True)
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "docs.parquet")
    (tmp_path / "docs.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    splits = {}
    for name in ("docs.jsonl", "docs.jsonl.gz", "docs.parquet", "docs.txt"):
        source = resolve_dataset(str(tmp_path / name))
        assert source.holdout  # a single file has no validation file beside it
        train = [ex["text"] for ex in load_documents(source, "train")]
        held_out = [ex["text"] for ex in load_documents(source, "validation")]
        splits[name] = (train, held_out)
    first = splits["docs.jsonl"]
    assert all(split == first for split in splits.values())
    train, held_out = first
    assert 0 < len(held_out) < len(texts) // 20
    assert sorted(train + held_out) == sorted(texts)


def test_directory_splits_validation_files_by_name(tmp_path):
    source, docs = make_corpus(tmp_path, num_shards=3)
    assert source.builder == "files" and not source.holdout
    assert [p.rsplit("/", 1)[-1] for p in source.validation_files] == ["validation-00000.jsonl"]
    assert len(source.train_files) == 3
    assert sorted(ex["text"] for ex in load_documents(source, "train")) == sorted(docs)
    assert [ex["text"] for ex in load_documents(source, "validation")] == ["held out"]


def test_bad_dataset_arguments_raise_one_line_errors(tmp_path):
    (tmp_path / "no_data").mkdir()
    (tmp_path / "no_data" / "notes.csv").write_text("a,b\n")
    cases = [
        (str(tmp_path / "missing"), FileNotFoundError, "no such file"),
        (str(tmp_path / "no_data"), FileNotFoundError, "no non-empty .jsonl.gz"),
        (str(tmp_path / "no_data" / "notes.csv"), ValueError, "unsupported file type"),
        ("openwebtext", ValueError, "unknown dataset"),
    ]
    for name, error, words in cases:
        with pytest.raises(error) as info:
            resolve_dataset(name)
        message = str(info.value)
        assert message.startswith(f"--dataset {name}:") and words in message and "\n" not in message


def test_documents_without_a_text_field_are_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match=f"--dataset {path}: {path} has no row with a string 'text' field"):
        check_documents(resolve_dataset(str(path)))


def test_a_folder_mixing_formats_reads_every_file(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", ["from the json lines"])
    (tmp_path / "b.txt").write_text("first paragraph\n\nsecond paragraph\n")
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "c.parquet")
    source = resolve_dataset(str(tmp_path))
    check_documents(source)
    documents = [ex["text"] for ex in load_documents(source, "train")] + \
        [ex["text"] for ex in load_documents(source, "validation")]
    assert sorted(documents) == ["first paragraph", "from parquet", "from the json lines", "second paragraph"]


def test_rows_without_string_text_are_skipped_and_counted(tmp_path, tokenizer):
    rows = ['{"text": "kept one"}', '{"content": "no text"}', '{"text": null}', '{"text": 5}', "not json",
            '{"text": ["a list"]}', '{"text": "kept two"}']
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    write_jsonl(tmp_path / "validation.jsonl", ["held out"])
    source = resolve_dataset(str(tmp_path))
    check_documents(source)  # the file has text: accepted
    notes = []
    batches = build_resumable_train_batches(source, tokenizer, max_length=16, batch_size=2, rank=0, world_size=1,
                                            num_workers=0, notify=notes.append)
    decoded = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
               for batch in itertools.islice(batches, 3) for ids, mask in zip(batch["input_ids"],
                                                                               batch["attention_mask"])]
    assert sorted(set(decoded)) == ["kept one", "kept two"]
    assert batches.data_counts()["documents_skipped"] >= 5 and batches.data_counts()["documents_truncated"] == 0
    assert len(notes) == 1 and "'text'" in notes[0]


def test_documents_longer_than_max_length_are_cut_counted_and_said_once(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", ["short", " ".join(["word"] * 100), " ".join(["more"] * 100)])
    write_jsonl(tmp_path / "validation.jsonl", ["held out"])
    notes = []
    batches = build_resumable_train_batches(resolve_dataset(str(tmp_path)), tokenizer, max_length=8, batch_size=3,
                                            rank=0, world_size=1, num_workers=0, notify=notes.append)
    batch = next(iter(batches))
    assert batch["attention_mask"].sum(dim=1).tolist().count(8) == 2  # cut to max_length, EOS kept
    assert batches.data_counts() == {"documents_skipped": 0, "documents_truncated": 2}
    next(iter(batches))
    assert len(notes) == 1 and "--max_length 8" in notes[0] and "--packing" in notes[0]


def test_sample_corpus_is_present_and_split(tokenizer):
    source = resolve_dataset("sample")
    assert [p.rsplit("/", 1)[-1] for p in source.train_files] == [
        f"train-{i:05d}-of-00008.jsonl.gz" for i in range(8)
    ]
    assert [p.rsplit("/", 1)[-1] for p in source.validation_files] == ["validation-00000-of-00001.jsonl.gz"]
    shards = []
    for path in source.train_files + source.validation_files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            shards.append([json.loads(line)["text"] for line in f])
    train = {text for shard in shards[:-1] for text in shard}
    validation = set(shards[-1])
    assert not train & validation
    assert 0.03 < len(validation) / (len(train) + len(validation)) < 0.07
    total_chars = sum(len(t) for t in train | validation)
    assert 8e6 < total_chars < 13e6
    compressed = sum(SAMPLE_DIR.joinpath(p).stat().st_size for p in source.train_files + source.validation_files)
    assert 2.5e6 < compressed < 5e6
    words = sorted(len(t.split()) for t in train)
    assert 200 < words[len(words) // 2] < 3000  # C4-like documents: hundreds to thousands of words
    batch = next(iter(build_eval_dataloader(source, tokenizer, max_length=64, batch_size=4, rank=0, world_size=1)))
    assert batch["input_ids"].shape == (4, 64)


# ---------------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("num_shards", [8, 5])  # 5 does not divide 2 ranks: datasets strides examples instead
def test_each_document_once_per_epoch_across_ranks_and_workers(tmp_path, tokenizer, num_shards):
    source, docs = make_corpus(tmp_path, num_shards)
    for num_epochs in (1, 2):
        counts = collections.Counter()
        for rank in (0, 1):
            loader = build_train_dataloader(source, tokenizer, max_length=32, batch_size=3, rank=rank, world_size=2,
                                            num_workers=2, num_epochs=num_epochs, shuffle_buffer=4)
            assert loader.num_workers == 2
            counts.update(decoded_rows(loader, tokenizer))
        assert set(counts) == set(docs)
        assert set(counts.values()) == {num_epochs}


def test_eval_loader_splits_validation_across_ranks(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", ["train doc"])
    validation = [f"validation document {i}" for i in range(25)]
    for shard in range(3):
        write_jsonl(tmp_path / f"validation-{shard}.jsonl", validation[shard::3])
    source = resolve_dataset(str(tmp_path))
    rows = []
    for rank in (0, 1):
        loader = build_eval_dataloader(source, tokenizer, max_length=16, batch_size=4, rank=rank, world_size=2,
                                       num_workers=2)
        rows += decoded_rows(loader, tokenizer)
    assert sorted(rows) == sorted(validation)


def test_first_epoch_is_the_reference_stream_and_later_epochs_reshuffle(tmp_path, tokenizer):
    source, docs = make_corpus(tmp_path, num_shards=4)
    reference = split_dataset_by_node(
        load_dataset("json", data_files=list(source.train_files), split="train", streaming=True).shuffle(
            seed=42, buffer_size=8
        ),
        rank=1,
        world_size=2,
    )
    loader = build_train_dataloader(source, tokenizer, max_length=32, batch_size=5, rank=1, world_size=2,
                                    num_workers=0, shuffle_buffer=8, num_epochs=2)
    rows = decoded_rows(loader, tokenizer)
    first, second = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    assert first == [ex["text"] for ex in reference]
    assert second != first  # re-shuffled (and the rank's shards re-drawn) with seed + 1


def test_train_loader_repeats_by_default(tmp_path, tokenizer):
    source, docs = make_corpus(tmp_path, num_shards=2, docs_per_shard=3)
    loader = build_train_dataloader(source, tokenizer, max_length=16, batch_size=2, rank=0, world_size=1,
                                    num_workers=2)
    batches = iter(loader)
    rows = [tokenizer.decode(row, skip_special_tokens=True) for _ in range(9) for row in next(batches)["input_ids"]]
    del batches
    counts = collections.Counter(rows)
    assert set(counts) == set(docs) and min(counts.values()) >= 2  # each worker is past its second pass


def test_a_worker_whose_share_is_always_empty_does_not_stall_the_loader(tmp_path, tokenizer):
    # 3 one-document shards, 2 ranks: datasets strides examples; rank 1's worker 1 reads one shard, keeps nothing.
    for shard in range(3):
        write_jsonl(tmp_path / f"train-{shard}.jsonl", [f"only document of shard {shard}"])
    write_jsonl(tmp_path / "validation.jsonl", ["v"])
    source = resolve_dataset(str(tmp_path))
    loader = build_train_dataloader(source, tokenizer, max_length=16, batch_size=1, rank=1, world_size=2,
                                    num_workers=2)
    assert loader.num_workers == 2

    def stalled(signum, frame):
        raise TimeoutError("the loader waited forever on a worker with no documents")

    previous = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(60)
    try:
        batches = iter(loader)
        rows = [next(batches)["input_ids"] for _ in range(4)]
        del batches
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(rows) == 4


# ---------------------------------------------------------------------------------------------------- batches


def test_batches_are_right_padded_truncated_and_end_with_eos(tmp_path, tokenizer):
    long_doc = " ".join(f"word{i}" for i in range(200))
    texts = ["short one", long_doc, "a somewhat longer document of eleven words in all here"]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    write_jsonl(tmp_path / "validation.jsonl", ["v"])
    source = resolve_dataset(str(tmp_path))
    max_length = 24
    loader = build_train_dataloader(source, tokenizer, max_length=max_length, batch_size=3, rank=0, world_size=1,
                                    num_workers=0, shuffle_buffer=1, num_epochs=1)
    batch = next(iter(loader))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (3, max_length) and ids.dtype == mask.dtype
    for row, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        expected = tokens[: max_length - 1] + [tokenizer.eos_token_id]
        length = len(expected)
        assert ids[row, :length].tolist() == expected
        assert mask[row].tolist() == [1] * length + [0] * (max_length - length)
        assert (ids[row, length:] == tokenizer.pad_token_id).all()
    assert mask[1].all()  # the long document fills its row and still ends in EOS


def test_packing_fills_rows_with_documents_joined_by_eos(tmp_path, tokenizer):
    texts = [f"document number {i} " + "la " * (i % 7) for i in range(40)]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    write_jsonl(tmp_path / "validation.jsonl", ["v"])
    source = resolve_dataset(str(tmp_path))
    loader = build_train_dataloader(source, tokenizer, max_length=16, batch_size=4, rank=0, world_size=1,
                                    num_workers=0, shuffle_buffer=1, packing=True, num_epochs=1)
    batches = list(loader)
    assert all(b["attention_mask"].all() and b["input_ids"].shape[1] == 16 for b in batches)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [i for ids in encoded for i in ids + [tokenizer.eos_token_id]]
    packed = [i for b in batches for i in b["input_ids"].flatten().tolist()]
    assert packed == stream[: len(stream) // 16 * 16]



def test_a_hanging_hub_connection_counts_as_unreachable_after_the_timeout(monkeypatch):
    for name in data.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data, "HUB_CONNECT_TIMEOUT", 0.2)
    def hang(*args, **kwargs):  # like DNS that does not answer
        time.sleep(2)
        raise OSError("timed out")

    monkeypatch.setattr(data.socket, "create_connection", hang)
    started = time.monotonic()
    assert "no connection to huggingface.co" in data.hub_unreachable()
    assert time.monotonic() - started < 1.0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_unreachable() == "HF_HUB_OFFLINE=1"
