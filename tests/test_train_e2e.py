"""End-to-end training runs on CPU with a tiny LLaMA on the built-in sample corpus, in-process through
`peft_pretraining.run` (torchrun only for the two-process test)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import peft_pretraining
from peft_pretraining.distributed import accelerate_launch_notes
from peft_pretraining.schedules import cosine_factor

REPO = Path(__file__).resolve().parents[1]
UPDATE_KEYS = {"step", "loss", "lr", "tokens_seen", "throughput_tokens", "throughput_examples",
               "throughput_batches", "grad_norm", "grad_norm_afterclip", "skipped_updates", "tokens_per_s", "tflops",
               "peak_memory_gb"}
EVAL_KEYS = {"step", "eval_loss", "eval_ppl", "eval_tokens", "eval_loss_reference"}


def run_argv(config: Path, save_dir: Path, *flags: str) -> list[str]:
    return ["--model_config", str(config), "--dataset", "sample", "--batch_size", "2", "--max_length", "32",
            "--lr", "1e-2", "--warmup_steps", "2", "--num_training_steps", "8", "--eval_tokens", "256",
            "--workers", "0", "--unset_wandb", "--save_dir", str(save_dir), *flags]


def read_metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def update_losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def test_training_reduces_loss_and_records_everything(tiny_config, tmp_path):
    save_dir = tmp_path / "run"
    result = peft_pretraining.run(run_argv(tiny_config, save_dir, "--num_training_steps", "20", "--eval_every",
                                           "10", "--save_every", "10"))
    records = read_metrics(save_dir)
    updates = [r for r in records if "loss" in r]
    assert [r["step"] for r in updates] == list(range(1, 21))  # exactly N updates (the reference ran N+1)
    assert all(set(r) == UPDATE_KEYS for r in updates)
    losses = update_losses(records)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    # The rate each update used: warm-up from 0 over 2 updates, then the cosine down to 10% at update 20.
    assert [updates[0]["lr"], updates[1]["lr"]] == [0.0, pytest.approx(0.5e-2)]
    assert updates[-1]["lr"] == pytest.approx(1e-2 * cosine_factor(19, warmup_steps=2, num_training_steps=20,
                                                                    min_lr_ratio=0.1))

    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert set(evals[0]) == EVAL_KEYS
    assert set(evals[1]) == EVAL_KEYS | {"final_eval_loss", "final_eval_tokens", "documents_skipped",
                                         "documents_truncated"}
    assert evals[1]["documents_skipped"] == 0 and evals[1]["documents_truncated"] > 0  # the sample's documents
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_loss_reference"] < evals[1]["eval_loss"]  # the n/(n+1) bias
    assert result.final_metrics["final_eval_loss"] == evals[1]["eval_loss"]

    run_config = json.loads((save_dir / "run_config.json").read_text())
    assert run_config["max_lr"] == run_config["lr"] == 1e-2
    assert run_config["total_params_M"] == 4.18 and run_config["world_size"] == 1
    assert run_config["device"] == "cpu" and run_config["model"]["hidden_size"] == 64
    run_env = json.loads((save_dir / "run_env.json").read_text())
    assert run_env["versions"]["torch"] == torch.__version__ and "commit" in run_env["git"]

    for step in (10, 20):
        checkpoint = save_dir / f"model_{step}"
        assert {"config.json", "model.safetensors", "optimizer.pt", "training_state.json"} <= \
            {p.name for p in checkpoint.iterdir()}
    state = json.loads((save_dir / "model_20" / "training_state.json").read_text())
    assert (state["update_step"], state["global_step"]) == (20, 20) and state["tokens_seen"] > 0
    reloaded = LlamaForCausalLM.from_pretrained(save_dir / "model_20")
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, result.model.state_dict()[name], rtol=0, atol=0)


QUANT_AND_PRECISION = {
    "int4_w_a": ["--act_quant", "--weight_bits", "4", "--weight_group_size", "64", "--act_group_size", "32",
                 "--act_stochastic"],
    "fp4_ref": ["--fp4"],
    "mxfp4": ["--weight_format", "mxfp4", "--act_format", "mxfp4"],
    "nvfp4": ["--weight_format", "nvfp4", "--act_format", "nvfp4"],
    "pure_bf16_checkpointed": ["--dtype", "bfloat16", "--activation_checkpointing"],
    "bf16_mixed_int4": ["--dtype", "bf16_mixed", "--act_quant", "--weight_bits", "4", "--weight_group_size", "64"],
}


@pytest.mark.parametrize("flags", QUANT_AND_PRECISION.values(), ids=QUANT_AND_PRECISION.keys())
def test_quantized_and_low_precision_runs_learn(tiny_config, tmp_path, flags):
    result = peft_pretraining.run(run_argv(tiny_config, tmp_path, *flags, "--num_training_steps", "6",
                                           "--eval_tokens", "128"))
    losses = update_losses(read_metrics(tmp_path))
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3
    assert result.final_metrics["eval_loss"] < losses[0]


OPTIMIZER_RUNS = {
    "stablespam": ["--optimizer", "stablespam", "--gamma1", "0.7", "--gamma2", "0.9", "--update_proj_gap", "4",
                   "--total_T", "8"],
    "spam": ["--optimizer", "spam", "--update_proj_gap", "4", "--density", "0.5", "--warmup_epoch", "2",
             "--grad_accu_steps", "2"],
    "lion": ["--optimizer", "lion", "--lr", "3e-3"],
    "adam_gradclip": ["--optimizer", "adam", "--grad_clipping", "0.1"],
    "adamw_linear_packed": ["--optimizer", "adamw", "--weight_decay", "0.1", "--scheduler", "linear", "--packing"],
}


@pytest.mark.parametrize("name", OPTIMIZER_RUNS)
def test_optimizers_train(tiny_config, tmp_path, name):
    peft_pretraining.run(run_argv(tiny_config, tmp_path, *OPTIMIZER_RUNS[name], "--eval_tokens", "128"))
    updates = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert updates[-1]["loss"] < updates[0]["loss"] - 0.3
    if name == "adam_gradclip":
        assert all(r["grad_norm_afterclip"] == pytest.approx(min(r["grad_norm"], 0.1), rel=1e-5) for r in updates)


def test_resume_continues_like_an_uninterrupted_run(tiny_config, tmp_path):
    full = peft_pretraining.run(run_argv(tiny_config, tmp_path / "full", "--num_training_steps", "6",
                                         "--save_every", "3", "--eval_tokens", "64"))
    resumed = peft_pretraining.run(run_argv(tiny_config, tmp_path / "resumed", "--num_training_steps", "6",
                                            "--eval_tokens", "64", "--continue_from", str(tmp_path / "full"),
                                            "--resume_step", "3", "--restore_optimizer"))
    assert resumed.state.update_step == 6 and resumed.state.global_step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r] == [4, 5, 6]
    for name, tensor in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-7)


def test_missing_checkpoint_is_a_usage_error(tiny_config, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = peft_pretraining.main(run_argv(tiny_config, tmp_path / "run", "--continue_from", str(tmp_path / "empty")))
    assert code == 2 and "--continue_from" in capsys.readouterr().err


@pytest.mark.parametrize("flags, flag", [
    (["--optimizer", "adamx"], "--optimizer adamx: unknown"),
    (["--dataset", "no_such_corpus"], "--dataset no_such_corpus"),
    (["--total_batch_size", "3"], "--total_batch_size 3"),
    (["--weight_format", "mxfp4", "--weight_group_size", "64"], "--weight_format mxfp4"),
    (["--optimizer_variant", "corrected"], "--optimizer_variant"),
    (["--max_length", "128"], "--max_length 128"),
])
def test_bad_inputs_exit_2_with_one_line(tiny_config, tmp_path, capsys, flags, flag):
    assert peft_pretraining.main(run_argv(tiny_config, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main_pretrain.py: error:") and flag in err


def test_bad_config_files_exit_2(tmp_path, capsys):
    malformed = tmp_path / "bad.json"
    malformed.write_text("{not json")
    for config in (tmp_path / "missing.json", malformed):
        assert peft_pretraining.main(run_argv(config, tmp_path / "run")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--model_config {config}" in err


def test_entry_point_script_exits_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "main_pretrain.py"), "--model_config", "configs/llama_9m.json",
                           "--batch_size", "2", "--optimizer", "galore_adamw", "--rank", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--rank 0" in done.stderr


# ------------------------------------------------------------------------------ two processes (torchrun, gloo)

RANK_SCRIPT = """
import os, sys, torch, peft_pretraining
result = peft_pretraining.run(sys.argv[2:])
torch.save(result.model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


def write_long_documents(directory: Path) -> Path:
    """Documents longer than max_length, so every sequence is full and per-rank means weigh equally."""
    words = "alpha beta gamma delta stone river light green house music paper window garden cloud".split()
    rng = random.Random(0)
    directory.mkdir()
    for name, count in (("train.jsonl", 48), ("validation.jsonl", 8)):
        lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) for _ in range(count)]
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def run_process_group(command: list[str], timeout: float = 180) -> tuple[int, str]:
    """Run torchrun in its own session so a hang kills the ranks too, not only the launcher."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stderr


def two_process_run(tmp_path: Path, launcher: list[str], save_dir: Path, argv: list[str]) -> dict:
    """Run RANK_SCRIPT under `launcher` (2 processes); returns both ranks' final weights."""
    script = tmp_path / "rank_run.py"
    script.write_text(RANK_SCRIPT)
    out_dir = save_dir.with_name(f"{save_dir.name}_weights")
    out_dir.mkdir()
    returncode, stderr = run_process_group([*launcher, str(script), str(out_dir), *argv])
    assert returncode == 0, stderr[-3000:]
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in (0, 1)}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_under_torchrun_and_accelerate(tiny_config, tmp_path):
    """Rank r of 2 reads documents r, r+2, ... of the same shuffled stream, so an update of 2 ranks x 2
    micro-batches of 1 (DDP, no_sync on the first) sees the 1 x 4 run's batch; with full sequences every
    micro-batch mean weighs the same, so the averaged gradient equals the 1-process mean.
    `accelerate launch --multi_gpu --num_processes 2` starts torch.distributed.run's processes (on CPU too):
    the same environment contract, so the same bits as torchrun."""
    dataset = write_long_documents(tmp_path / "docs")
    common = ["--dataset", str(dataset), "--tokenizer", "builtin", "--optimizer", "sgd", "--lr", "0.5",
              "--num_training_steps", "3", "--warmup_steps", "0", "--total_batch_size", "4", "--eval_tokens", "64"]
    ddp_argv = ["--batch_size", "1"]  # 2 micro-batches per update
    by_torchrun = two_process_run(tmp_path, TORCHRUN, tmp_path / "ddp",
                                  run_argv(tiny_config, tmp_path / "ddp", *common, *ddp_argv))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  str(free_port())]
    by_accelerate = two_process_run(tmp_path, accelerate, tmp_path / "accelerate",
                                    run_argv(tiny_config, tmp_path / "accelerate", *common, *ddp_argv))
    single = peft_pretraining.run(run_argv(tiny_config, tmp_path / "single", *common, "--batch_size", "4"))
    for run in ("ddp", "accelerate"):
        run_config = json.loads((tmp_path / run / "run_config.json").read_text())
        assert (run_config["world_size"], run_config["gradient_accumulation"]) == (2, 2)
    for name, tensor in single.model.state_dict().items():
        assert torch.equal(by_torchrun[0][name], by_torchrun[1][name]), name
        assert torch.equal(by_accelerate[0][name], by_torchrun[0][name]), name
        assert torch.equal(by_accelerate[1][name], by_torchrun[0][name]), name
        torch.testing.assert_close(by_torchrun[0][name], tensor, rtol=1e-4, atol=1e-6)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("accelerate", "ddp")]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    updates = [r for r in read_metrics(tmp_path / "single") if "loss" in r]
    assert len(updates) == 3 and all(r["grad_norm"] > 0 and r["lr"] > 0 for r in updates)


@pytest.mark.slow
def test_compiled_fsdp_run_matches_one_eager_process(tiny_config, tmp_path):
    """--compile under FSDP2 (each compiled layer sharded; gradient sync on the last of 2 micro-batches): the
    same updates as one eager process over the same global batch. DDP's hooks sit outside the compiled graphs
    as FSDP2's do, so this sharded case stands for both (each compiled 2-process run costs two cold compiles).
    SGD, as in the eager DDP test: an Adam-type step turns float reordering in near-zero gradient entries into
    sign flips of size lr, which would hide a real error (the compiled StableSPAM core over shards is tested in
    test_fsdp.py)."""
    dataset = write_long_documents(tmp_path / "docs")
    common = ["--dataset", str(dataset), "--tokenizer", "builtin", "--optimizer", "sgd", "--lr", "0.5",
              "--num_training_steps", "3", "--warmup_steps", "0", "--total_batch_size", "4", "--eval_tokens", "64"]
    returncode, stderr = run_process_group([*TORCHRUN, str(REPO / "main_pretrain.py"),
                                            *run_argv(tiny_config, tmp_path / "ranks", *common, "--compile",
                                                      "--fsdp", "--batch_size", "1")])
    assert returncode == 0, stderr[-3000:]
    compiled = load_file(tmp_path / "ranks" / "model_3" / "model.safetensors")  # gathered under FSDP2
    single = peft_pretraining.run(run_argv(tiny_config, tmp_path / "single", *common, "--batch_size", "4"))
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-4, atol=1e-6)
    compiled_losses = [r["loss"] for r in read_metrics(tmp_path / "ranks") if "loss" in r]
    eager_losses = [r["loss"] for r in read_metrics(tmp_path / "single") if "loss" in r]
    assert len(compiled_losses) == 3
    # rank 0 logs its own micro-batch loss (a quarter of the global batch): compare the trend, not values
    assert compiled_losses[-1] < compiled_losses[0] and eager_losses[-1] < eager_losses[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_settings_we_do_not_follow_are_named():
    assert accelerate_launch_notes({}) == []
    assert accelerate_launch_notes({"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no",
                                    "ACCELERATE_DYNAMO_BACKEND": "NO", "WORLD_SIZE": "2"}) == []
    cpu, precision, dynamo = accelerate_launch_notes({"ACCELERATE_USE_CPU": "True",
                                                      "ACCELERATE_MIXED_PRECISION": "bf16",
                                                      "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"})
    assert "--multi_gpu --num_processes N" in cpu
    assert "--dtype" in precision and "--compile" in dynamo


def test_a_small_eval_set_is_warned_about_once_and_the_reference_estimator_explained(tiny_config, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n\n".join(f"paragraph {i} of the training text" for i in range(40)))
    (corpus / "validation.txt").write_text("a short held-out paragraph")
    peft_pretraining.run(run_argv(tiny_config, tmp_path / "run", "--dataset", str(corpus), "--tokenizer", "builtin",
                                  "--num_training_steps", "4", "--eval_every", "2", "--eval_tokens", "10M"))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "evaluation set" in line]
    assert len(warnings) == 1 and "under 10,000" in warnings[0] and "reference estimator" in warnings[0]
    final = next(line for line in out.splitlines() if line.startswith("Final eval"))
    assert "reference estimator, the papers' sum of batch mean losses over batches + 1" in final
