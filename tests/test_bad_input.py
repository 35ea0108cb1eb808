"""Every user error exits 2 with one line on stderr naming the flag or file, and leaves what exists as it was.

Each case of the table runs `peft_pretraining.main` in-process against a workspace holding an earlier run's
directory (passed as --save_dir) and the inputs the case needs; afterwards every file of the workspace must be
byte-identical and no file or directory may have appeared. Two cases go through a real `main_pretrain.py`
process to show the user sees no traceback.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import peft_pretraining
from peft_pretraining import data
from peft_pretraining.args import parse_args, resolve_batch_arithmetic
from peft_pretraining.data import resolve_dataset
from peft_pretraining.metrics import METRICS_FILE, RUN_CONFIG_FILE, RUN_ENV_FILE
from peft_pretraining.model import load_llama_config
from peft_pretraining.preflight import check_run_inputs, check_wandb_key

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
TINY_CONFIG = {"hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.02,
               "max_sequence_length": 64, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
               "pad_token_id": -1, "rms_norm_eps": 1e-06, "vocab_size": 32000}
NO_TEXT_FIELD = '{"content": "documents of this corpus have no text field"}\n'
BINARY = bytes(range(128, 256)) * 8  # no UTF-8 text starts with a continuation byte
RUN_DIR = "earlier_run"  # an earlier run's --save_dir, which a failed start must not touch


def write(workspace: Path, name: str, content: str | bytes) -> str:
    path = workspace / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def directory(workspace: Path, name: str, files: dict[str, str] | None = None) -> str:
    """A directory holding `files` (name -> text), possibly none."""
    path = workspace / name
    path.mkdir()
    for file_name, text in (files or {}).items():
        (path / file_name).write_text(text)
    return str(path)


def config(workspace: Path, name: str, *, drop: tuple[str, ...] = (), **changes) -> str:
    """The tiny config with keys dropped or changed, written to the workspace."""
    fields = {key: value for key, value in {**TINY_CONFIG, **changes}.items() if key not in drop}
    return write(workspace, name, json.dumps(fields))


def big_vocab_tokenizer(workspace: Path) -> str:
    """A local tokenizer directory with 32,007 ids: more than the config's 32,000 embedding rows."""
    vocab = {f"w{i}": i for i in range(TINY_CONFIG["vocab_size"] + 5)}
    vocab.update({"<unk>": len(vocab), "</s>": len(vocab) + 1})
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    path = workspace / "big_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return str(path)


def read_only_dir(workspace: Path) -> str:
    path = workspace / "read_only"
    path.mkdir()
    path.chmod(0o555)
    return str(path / "run")


def make_workspace(workspace: Path) -> None:
    """The tiny config and an earlier run's directory: run record, metrics and one checkpoint."""
    config(workspace, "tiny.json")
    write(workspace, f"{RUN_DIR}/{RUN_CONFIG_FILE}", json.dumps({"lr": 0.001}))
    write(workspace, f"{RUN_DIR}/{RUN_ENV_FILE}", json.dumps({"argv": []}))
    write(workspace, f"{RUN_DIR}/{METRICS_FILE}", '{"step": 1, "loss": 10.4}\n{"step": 2, "loss": 10.3}\n')
    write(workspace, f"{RUN_DIR}/model_2/config.json", json.dumps(TINY_CONFIG))
    write(workspace, f"{RUN_DIR}/model_2/model.safetensors", bytes(range(256)))
    write(workspace, f"{RUN_DIR}/model_2/optimizer.pt", b"\x80\x02optimizer state")
    write(workspace, f"{RUN_DIR}/model_2/training_state.json", json.dumps({"update_step": 2, "global_step": 2}))


def base_argv(workspace: Path) -> list[str]:
    """A valid tiny run (never reached: each case appends one bad flag; argparse keeps the last value)."""
    return ["--model_config", str(workspace / "tiny.json"), "--dataset", "sample", "--tokenizer", "builtin",
            "--batch_size", "2", "--max_length", "32", "--num_training_steps", "2", "--warmup_steps", "1",
            "--eval_every", "2", "--save_every", "2", "--eval_tokens", "64", "--workers", "0", "--unset_wandb",
            "--save_dir", str(workspace / RUN_DIR)]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory)."""
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in root.rglob("*")}


def flag(name: str, value: str):
    """A case that appends `name value`."""
    return lambda workspace: [name, value]


def permissions_ignored() -> bool:
    """True for root (CAP_DAC_OVERRIDE): chmod cannot make a directory read-only for this process."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o555)
        try:
            Path(tmp, "probe").touch()
            return True
        except PermissionError:
            return False
        finally:
            os.chmod(tmp, 0o755)


# (extra argv from the workspace, strings the one error line must contain)
CASES = [
    # the model config
    pytest.param(lambda ws: ["--model_config", str(ws / "missing.json")], ["--model_config", "missing.json"],
                 id="config-missing-file"),
    pytest.param(lambda ws: ["--model_config", write(ws, "bad.json", '{"hidden_size": 64')],
                 ["--model_config", "bad.json", "JSON"], id="config-malformed-json"),
    pytest.param(lambda ws: ["--model_config", write(ws, "list.json", "[64, 2]")], ["--model_config", "list.json"],
                 id="config-not-an-object"),
    pytest.param(lambda ws: ["--model_config", config(ws, "c.json", drop=("num_hidden_layers",))],
                 ["--model_config", "num_hidden_layers"], id="config-missing-key"),
    pytest.param(lambda ws: ["--model_config", config(ws, "c.json", hidden_size="64")],
                 ["--model_config", "hidden_size"], id="config-wrong-type"),
    pytest.param(lambda ws: ["--model_config", config(ws, "c.json", num_hidden_layers=-1)],
                 ["--model_config", "num_hidden_layers"], id="config-negative-size"),
    pytest.param(lambda ws: ["--model_config", config(ws, "c.json", num_attention_heads=3)],
                 ["--model_config", "attention heads"], id="config-heads-do-not-divide-hidden"),
    pytest.param(lambda ws: ["--model_config", config(ws, "c.json", rms_norm_eps="small")],
                 ["--model_config", "rms_norm_eps"], id="config-wrong-type-float-field"),
    pytest.param(lambda ws: ["--model_config", config(ws, "c.json", hidden_act="swish9")],
                 ["--model_config", "hidden_act"], id="config-unknown-activation"),
    # names: optimizer, formats, dataset, scheduler, dtype
    pytest.param(flag("--optimizer", "adamx"), ["--optimizer adamx"], id="unknown-optimizer"),
    pytest.param(lambda ws: ["--optimizer", "galore_adamw", "--rank", "0"], ["--rank 0"], id="galore-rank"),
    pytest.param(flag("--optimizer_variant", "fixed"), ["--optimizer_variant"], id="unknown-optimizer-variant"),
    pytest.param(flag("--weight_format", "int3"), ["--weight_format"], id="unknown-weight-format"),
    pytest.param(flag("--act_format", "fp8"), ["--act_format"], id="unknown-act-format"),
    pytest.param(flag("--dataset", "pile"), ["--dataset pile"], id="unknown-dataset"),
    pytest.param(flag("--dataset", "c4"), ["--dataset c4", "hub", "HF_", "--dataset sample"], id="c4-offline"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.txt": "text"}), "--tokenizer", "no-user/tok"],
                 ["--tokenizer no-user/tok", "--tokenizer builtin"], id="hub-tokenizer-offline"),
    pytest.param(flag("--scheduler", "step"), ["--scheduler"], id="unknown-scheduler"),
    pytest.param(flag("--dtype", "fp16"), ["--dtype fp16"], id="unknown-dtype"),
    pytest.param(lambda ws: ["--act_quant", "--weight_bits", "1"], ["--act_quant", "bits"],
                 id="quant-bits-out-of-range"),
    # batch sizes
    pytest.param(lambda ws: ["--batch_size", "3", "--total_batch_size", "8"], ["--total_batch_size 8"],
                 id="total-batch-not-a-multiple"),
    pytest.param(lambda ws: ["--total_batch_size", "8", "--gradient_accumulation", "3"],
                 ["--gradient_accumulation 3"], id="accumulation-contradicts-total-batch"),
    pytest.param(flag("--batch_size", "0"), ["--batch_size 0"], id="batch-size-zero"),
    # hyperparameters out of range
    pytest.param(flag("--lr", "0"), ["--lr"], id="lr-zero"),
    pytest.param(lambda ws: ["--lr=-0.001"], ["--lr"], id="lr-negative"),
    pytest.param(flag("--lr", "nan"), ["--lr nan"], id="lr-nan"),
    pytest.param(flag("--lr", "inf"), ["--lr inf"], id="lr-inf"),
    pytest.param(flag("--num_training_steps", "0"), ["--num_training_steps 0"], id="steps-zero"),
    pytest.param(lambda ws: ["--warmup_steps", "5", "--num_training_steps", "5"], ["--warmup_steps 5"],
                 id="warmup-not-below-steps"),
    pytest.param(flag("--max_train_tokens", "50"), ["--max_train_tokens"], id="token-budget-below-one-update"),
    pytest.param(flag("--beta1", "1.0"), ["--beta1 1.0"], id="beta1-one"),
    pytest.param(flag("--beta2", "-0.1"), ["--beta2 -0.1"], id="beta2-negative"),
    pytest.param(flag("--gamma1", "1.5"), ["--gamma1 1.5"], id="gamma1-above-one"),
    pytest.param(flag("--gamma2", "-0.5"), ["--gamma2 -0.5"], id="gamma2-negative"),
    pytest.param(flag("--gamma3", "1"), ["--gamma3 1.0"], id="gamma3-one"),
    pytest.param(flag("--eta", "2"), ["--eta 2.0"], id="eta-above-one"),
    pytest.param(flag("--density", "0"), ["--density 0.0"], id="density-zero"),
    pytest.param(flag("--density", "1.5"), ["--density 1.5"], id="density-above-one"),
    pytest.param(flag("--grad_clipping", "-1"), ["--grad_clipping -1.0"], id="grad-clipping-negative"),
    pytest.param(flag("--weight_decay", "-0.1"), ["--weight_decay -0.1"], id="weight-decay-negative"),
    pytest.param(flag("--eval_every", "0"), ["--eval_every 0"], id="eval-every-zero"),
    pytest.param(flag("--save_every", "-1"), ["--save_every -1"], id="save-every-negative"),
    pytest.param(flag("--max_length", "0"), ["--max_length 0"], id="max-length-zero"),
    pytest.param(flag("--max_length", "1"), ["--max_length 1"], id="max-length-one"),
    pytest.param(flag("--max_length", "128"), ["--max_length 128", "64 positions"],
                 id="max-length-beyond-config-positions"),
    pytest.param(flag("--workers", "-2"), ["--workers -2"], id="workers-negative"),
    # data
    pytest.param(lambda ws: ["--dataset", str(ws / "no_such_dir")], ["--dataset", "no_such_dir"],
                 id="dataset-missing-path"),
    pytest.param(lambda ws: ["--dataset", write(ws, "empty.jsonl", "")], ["--dataset", "empty.jsonl"],
                 id="dataset-empty-file"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus")], ["--dataset", "corpus"], id="dataset-empty-dir"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"README.md": "notes"})], ["--dataset", "corpus"],
                 id="dataset-dir-without-data-files"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.jsonl": NO_TEXT_FIELD})],
                 ["--dataset", "corpus", "'text'"], id="dataset-without-text-field"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.jsonl.gz": "not gzip"})],
                 ["--dataset", "corpus", "gzip"], id="dataset-not-gzip"),
    pytest.param(lambda ws: ["--dataset", os.path.dirname(write(ws, "corpus/a.txt", BINARY))],
                 ["--dataset", "corpus", "a.txt", "not UTF-8"], id="dataset-binary-txt"),
    pytest.param(lambda ws: ["--dataset", os.path.dirname(write(ws, "corpus/a.jsonl", BINARY))],
                 ["--dataset", "corpus", "a.jsonl", "not UTF-8"], id="dataset-binary-jsonl"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.jsonl": '{"text": 5}\n{"text": null}\n'})],
                 ["--dataset", "corpus", "a.jsonl", "string 'text'"], id="dataset-text-not-a-string"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.jsonl": "id,text\n1,hello\n"})],
                 ["--dataset", "corpus", "a.jsonl", "'text'"], id="dataset-jsonl-that-is-csv"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.parquet": "not parquet"})],
                 ["--dataset", "corpus", "a.parquet", "Parquet"], id="dataset-not-parquet"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.txt": "\n\n\n"})],
                 ["--dataset", "corpus", "a.txt", "no text"], id="dataset-txt-of-blank-lines"),
    # tokenizer
    pytest.param(lambda ws: ["--tokenizer", str(ws / "no_tokenizer")], ["--tokenizer", "no_tokenizer"],
                 id="tokenizer-missing-dir"),
    pytest.param(lambda ws: ["--tokenizer", big_vocab_tokenizer(ws)],
                 ["--tokenizer has 32007 ids", "vocab_size is 32000"],
                 id="tokenizer-vocab-bigger-than-config"),
    # save directory
    pytest.param(lambda ws: ["--save_dir", write(ws, "a_file", "in the way")], ["--save_dir", "a_file"],
                 id="save-dir-is-a-file"),
    pytest.param(lambda ws: ["--save_dir", write(ws, "a_file", "in the way") + "/run"], ["--save_dir", "a_file"],
                 id="save-dir-below-a-file"),
    pytest.param(lambda ws: ["--save_dir", read_only_dir(ws)], ["--save_dir", "read_only", "not writable"],
                 id="save-dir-read-only",
                 marks=pytest.mark.skipif(permissions_ignored(), reason="this user writes into read-only directories")),
    # resuming
    pytest.param(lambda ws: ["--continue_from", str(ws / "no_run")], ["--continue_from", "no_run"],
                 id="continue-from-nothing"),
    pytest.param(lambda ws: ["--continue_from", write(ws, "a_file", "x")], ["--continue_from", "a_file"],
                 id="continue-from-a-file"),
    pytest.param(lambda ws: ["--continue_from", directory(ws, "other_run", {METRICS_FILE: ""})],
                 ["--continue_from", "other_run"], id="continue-from-dir-without-checkpoint"),
    pytest.param(lambda ws: ["--continue_from", str(ws / RUN_DIR), "--resume_step", "7"], ["--resume_step 7"],
                 id="resume-step-without-checkpoint"),
    pytest.param(flag("--resume_step", "2"), ["--resume_step"], id="resume-step-without-continue-from"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def workspace(tmp_path):
    make_workspace(tmp_path)
    yield tmp_path
    for path in tmp_path.rglob("*"):  # let pytest clean up after the read-only case
        if path.is_dir():
            path.chmod(0o755)


def run_main(argv: list[str]) -> int:
    """`main`'s exit status; argparse's own errors (unknown choice, bad number) exit from inside the parser."""
    try:
        return peft_pretraining.main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("extra, expected", CASES)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(workspace, capsys, extra, expected):
    argv = base_argv(workspace) + extra(workspace)
    before = snapshot(workspace)
    code = run_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("main_pretrain.py: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert snapshot(workspace) == before


def test_the_base_command_line_passes_every_check(workspace):
    """The table proves something only if the command line it starts from is fine on its own."""
    args = parse_args(base_argv(workspace))
    resolve_batch_arithmetic(args, world_size=1)
    config = load_llama_config(args.model_config, max_length=args.max_length)
    check_run_inputs(args, resolve_dataset(args.dataset))
    assert (args.save_dir, args.gradient_accumulation, config.num_hidden_layers) == (str(workspace / RUN_DIR), 1, 2)


@pytest.mark.parametrize("extra, expected", [
    pytest.param(lambda ws: ["--save_dir", write(ws, "a_file", "in the way")], "--save_dir", id="save-dir-is-a-file"),
    pytest.param(lambda ws: ["--dataset", directory(ws, "corpus", {"a.jsonl": NO_TEXT_FIELD})], "--dataset",
                 id="dataset-without-text-field"),
])
def test_command_line_prints_one_line_without_traceback(workspace, extra, expected):
    argv = base_argv(workspace) + extra(workspace)
    before = snapshot(workspace)
    done = subprocess.run([sys.executable, str(REPO / "main_pretrain.py"), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert snapshot(workspace) == before


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """wandb online, and nowhere a key: no WANDB_API_KEY, an empty netrc."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_wandb_without_a_key_fails_at_once_before_writing(workspace, no_wandb_key, capsys):
    argv = [arg for arg in base_argv(workspace) if arg != "--unset_wandb"]
    before = snapshot(workspace)
    started = time.monotonic()
    code = run_main(argv)
    elapsed = time.monotonic() - started
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--unset_wandb" in lines[0] and "WANDB_MODE=offline" in lines[0]
    assert snapshot(workspace) == before and elapsed < 1.0


def test_wandb_key_is_found_where_wandb_looks(no_wandb_key, monkeypatch):
    with pytest.raises(ValueError, match="--unset_wandb"):
        check_wandb_key(unset_wandb=False)
    check_wandb_key(unset_wandb=True)
    no_wandb_key.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    check_wandb_key(unset_wandb=False)
    no_wandb_key.write_text("")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_MODE", "disabled"), ("WANDB_API_KEY", "0123")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            check_wandb_key(unset_wandb=False)


@pytest.fixture
def hub_down(monkeypatch):
    """Online settings, but every connection fails (as without network): nothing here touches the network."""
    for name in data.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data.socket, "create_connection", refuse)
    monkeypatch.setattr(data, "_in_hub_cache", lambda repo_id: False)


def test_offline_c4_and_hub_tokenizer_fail_within_seconds_with_one_line(workspace, hub_down, capsys):
    corpus = directory(workspace, "corpus", {"a.txt": "some text"})
    for extra, expected in ((["--dataset", "c4"], ["--dataset c4", "--dataset sample"]),
                            (["--dataset", corpus, "--tokenizer", "t5-base"],
                             ["--tokenizer t5-base", "--tokenizer builtin"])):
        started = time.monotonic()
        code = run_main(base_argv(workspace) + extra)
        lines = capsys.readouterr().err.splitlines()
        assert code == 2 and len(lines) == 1 and all(text in lines[0] for text in expected), lines
        assert time.monotonic() - started < 1.0  # a refused connection is known at once
