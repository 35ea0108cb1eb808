"""`--compile`: regional compilation of the decoder layers plus the optimizers' compiled/fused steps. It trains
like the eager run (same losses within float reordering), never recompiles per update, keeps the run's
guarantees (exact resume is in test_resume.py, DDP/FSDP2 in test_compile_distributed.py) and logs the cost
figures on every update line."""

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils

import peft_pretraining
from galore_torch import stable_spam
from peft_pretraining.args import parse_args
from peft_pretraining.metrics import RunLogger
from peft_pretraining.model import build_model, compile_layers, load_llama_config
from peft_pretraining.optim import build_optimizer
from peft_pretraining.throughput import model_flops_per_token
from quantization import QuantConfig

INT4_STABLESPAM = ["--optimizer", "stablespam", "--gamma1", "0.7", "--gamma2", "0.9", "--total_T", "10",
                   "--act_quant", "--weight_bits", "4", "--weight_group_size", "64", "--act_group_size", "32"]


def run_argv(config: Path, save_dir: Path, *flags: str) -> list[str]:
    return ["--model_config", str(config), "--dataset", "sample", "--tokenizer", "builtin", "--dtype", "float32",
            "--batch_size", "2", "--max_length", "32", "--lr", "1e-2", "--warmup_steps", "3",
            "--num_training_steps", "10", "--eval_every", "1000", "--eval_tokens", "64", "--workers", "0",
            "--unset_wandb", "--save_dir", str(save_dir), *flags]


def update_lines(save_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def compiled_and_eager(tiny_config, tmp_path_factory) -> dict:
    """The same INT4 StableSPAM run eager and compiled (momentum resets every 4 updates, an lr that changes
    every update), with the number of compiled graphs recorded as each update line is written."""
    graphs_at_step = {}
    original_log = RunLogger.log

    def counting_log(self, values, step):
        if "loss" in values:
            graphs_at_step[step] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        original_log(self, values, step)

    root = tmp_path_factory.mktemp("compile")
    flags = [*INT4_STABLESPAM, "--update_proj_gap", "4"]
    peft_pretraining.run(run_argv(tiny_config, root / "eager", *flags))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunLogger, "log", counting_log)
        compiled = peft_pretraining.run(run_argv(tiny_config, root / "compiled", *flags, "--compile"))
    return {"eager": update_lines(root / "eager"), "compiled": update_lines(root / "compiled"),
            "graphs": graphs_at_step, "result": compiled}


def test_compiled_run_trains_like_the_eager_run(compiled_and_eager):
    eager, compiled = compiled_and_eager["eager"], compiled_and_eager["compiled"]
    assert [r["step"] for r in compiled] == list(range(1, 11))
    assert [r["lr"] for r in compiled] == [r["lr"] for r in eager]
    # Inductor reorders float sums; INT4 rounding can then flip a code, so losses agree closely, not bitwise.
    torch.testing.assert_close([r["loss"] for r in compiled], [r["loss"] for r in eager], rtol=2e-3, atol=0)
    assert compiled[-1]["loss"] < compiled[0]["loss"] - 0.3


def test_compiled_run_does_not_recompile_per_update(compiled_and_eager):
    """Graphs are compiled at the first update (the decoder layer, shared by every layer, and the optimizer
    core) and at the first momentum reset (the core's reset variant, once); the lr that changes every update
    and the later resets (updates 8) reuse them."""
    graphs = compiled_and_eager["graphs"]
    first_reset = 4
    grew_at = [step for step in range(2, 11) if graphs[step] > graphs[step - 1]]
    assert set(grew_at) <= {first_reset}, graphs
    assert graphs[10] == graphs[first_reset]


def test_every_update_line_carries_cost_figures(compiled_and_eager, tiny_config):
    flops_per_token = model_flops_per_token(load_llama_config(tiny_config, max_length=32), 32)
    for record in compiled_and_eager["compiled"]:
        assert record["tokens_per_s"] > 0 and record["peak_memory_gb"] > 0
        # TFLOP/s over tokens/s (one process) is the model's FLOPs per token, whatever the clock said
        assert record["tflops"] * 1e12 / record["tokens_per_s"] == pytest.approx(flops_per_token, rel=1e-9)
        assert record["tokens_per_s"] >= record["throughput_tokens"]  # pad positions count as computed
        assert "mfu" not in record  # CPU: no known peak, and no --peak_tflops


def test_compile_flag_compiles_layers_and_picks_fast_optimizer_steps(tiny_config):
    argv = ["--model_config", str(tiny_config), "--batch_size", "2", "--dataset", "sample", "--compile"]
    config = load_llama_config(tiny_config, max_length=32)
    model, _ = build_model(config, dtype="float32", device=torch.device("cpu"))
    assert compile_layers(model) == 2
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in model.model.layers)
    assert set(model.state_dict()) == set(build_model(config, dtype="float32", device=torch.device("cpu"))[0]
                                         .state_dict())  # parameter names unchanged: checkpoints are the same
    stablespam = build_optimizer(model, parse_args([*argv, "--optimizer", "stablespam"]))
    assert stablespam._core is not stable_spam.update_buckets  # the compiled core
    assert build_optimizer(model, parse_args([*argv, "--optimizer", "adamw"])).defaults["fused"] is True
    assert build_optimizer(model, parse_args([*argv[:-1], "--optimizer", "adamw"])).defaults["fused"] is None


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_activation_checkpointing_gives_the_same_losses(tiny_config, tmp_path, compiled):
    """Recomputing each decoder layer in backward changes memory, not numbers (also inside compiled layers)."""
    flags = [*INT4_STABLESPAM, "--num_training_steps", "4", *(["--compile"] if compiled else [])]
    peft_pretraining.run(run_argv(tiny_config, tmp_path / "stored", *flags))
    peft_pretraining.run(run_argv(tiny_config, tmp_path / "recomputed", *flags, "--activation_checkpointing"))
    stored, recomputed = (update_lines(tmp_path / run) for run in ("stored", "recomputed"))
    assert len(stored) == 4
    assert [r["loss"] for r in recomputed] == [r["loss"] for r in stored]
    assert [r["grad_norm"] for r in recomputed] == [r["grad_norm"] for r in stored]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_int4_run_on_cuda_trains_and_logs_mfu(tiny_config, tmp_path):
    """On a GPU: pure bf16 with --compile (the CUDA kernels inductor writes), INT4 W4A4 and StableSPAM's
    compiled core; MFU is logged against the known peak of the device or --peak_tflops."""
    peft_pretraining.run(run_argv(tiny_config, tmp_path, *INT4_STABLESPAM, "--compile", "--dtype", "bfloat16",
                                  "--peak_tflops", "100"))
    updates = update_lines(tmp_path)
    assert len(updates) == 10 and updates[-1]["loss"] < updates[0]["loss"] - 0.3
    assert all(0 < r["mfu"] < 1 and r["peak_memory_gb"] > 0 for r in updates)


def test_compiled_layers_take_new_shapes_with_stochastic_rounding(tiny_config):
    """Each new batch shape gets a static graph: one traced with symbolic sizes could not draw the
    stochastic-rounding noise (torch.rand needs concrete sizes), and dynamo would make the sizes symbolic at
    the second shape by default."""
    config = load_llama_config(tiny_config, max_length=32)
    stochastic = QuantConfig("int", bits=4, group_size=32, symmetric=True, topk=2, stochastic=True)
    model, _ = build_model(config, dtype="float32", device=torch.device("cpu"), act_quant=stochastic)
    compile_layers(model)
    for batch, length in ((2, 32), (3, 16), (1, 8)):
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(batch))
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
