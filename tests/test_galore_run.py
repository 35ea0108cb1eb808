"""The GaLore optimizers in `main_pretrain.py`: every reference name trains on the sample data, per-layer
updates equal whole-model ones, resume is exact, two DDP ranks stay identical, and what GaLore cannot do
is refused in one line."""

import json
import sys
from pathlib import Path

import pytest
import torch

import peft_pretraining
from galore_torch import OPTIMIZERS, GaLoreAdamW, PerLayerOptimizer
from peft_pretraining.args import parse_args, resolve_batch_arithmetic
from test_train_e2e import RANK_SCRIPT, run_process_group, write_long_documents

GALORE_FLAGS = ["--rank", "8", "--update_proj_gap", "5", "--galore_scale", "0.25"]
EIGHT_BIT = ["galore_adamw8bit", "galore_adamw8bit_per_layer", "q_galore_adamw8bit", "q_galore_adamw8bit_per_layer"]


def run_argv(config: Path, save_dir: Path, *flags: str) -> list[str]:
    return ["--model_config", str(config), "--dataset", "sample", "--tokenizer", "builtin", "--dtype", "float32",
            "--batch_size", "2", "--max_length", "32", "--lr", "1e-2", "--warmup_steps", "1",
            "--num_training_steps", "6", "--eval_every", "1000", "--save_every", "1000", "--eval_tokens", "32",
            "--workers", "0", "--unset_wandb", "--save_dir", str(save_dir), *flags]


def update_losses(save_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def weights(result) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in result.model.state_dict().items()}


@pytest.mark.parametrize("name, extra", [
    ("galore_adamw", []),
    ("galore_adamw", ["--proj_quant", "--proj_bits", "4", "--proj_type", "full"]),
    ("galore_adafactor", []),
    ("galore_stablespam", ["--momentum_reset_gap", "3", "--total_T", "6"]),
    ("galore_spam", ["--density", "0.5", "--momentum_reset_gap", "3"]),
    *[(name, ["--proj_quant"] if name.startswith("q_") else []) for name in EIGHT_BIT],
], ids=["galore_adamw", "galore_adamw-proj_quant", "galore_adafactor", "galore_stablespam", "galore_spam",
        *EIGHT_BIT])
def test_reference_names_train_on_the_sample_data(tiny_config, tmp_path, name, extra):
    if name in EIGHT_BIT:
        pytest.importorskip("galore_torch.blockwise8bit")
    result = peft_pretraining.run(run_argv(tiny_config, tmp_path, "--optimizer", name, *GALORE_FLAGS, *extra,
                                           "--num_training_steps", "4"))
    losses = update_losses(tmp_path)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert result.state.update_step == 4


class GaLoreAdamWPerLayer(PerLayerOptimizer):
    optimizer_class = GaLoreAdamW


def test_per_layer_run_matches_the_whole_model_run_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """The trainer's step/scheduler calls are inert for the per-layer wrapper; the hooks and one LambdaLR give
    the whole-model optimizer's weights. The per-layer run resumed with its optimizer state continues exactly
    (the per-param GaLore states, projectors included, travel through torch.distributed.checkpoint)."""
    monkeypatch.setitem(OPTIMIZERS, "galore_adamw_per_layer", GaLoreAdamWPerLayer)
    whole = peft_pretraining.run(run_argv(tiny_config, tmp_path / "whole", "--optimizer", "galore_adamw",
                                          *GALORE_FLAGS))
    per_layer = peft_pretraining.run(run_argv(tiny_config, tmp_path / "per_layer", "--optimizer",
                                              "galore_adamw_per_layer", *GALORE_FLAGS, "--save_every", "3"))
    assert update_losses(tmp_path / "whole") == update_losses(tmp_path / "per_layer")
    for name, tensor in weights(whole).items():
        torch.testing.assert_close(weights(per_layer)[name], tensor, rtol=0, atol=0)
    resumed = peft_pretraining.run(run_argv(tiny_config, tmp_path / "resumed", "--optimizer",
                                            "galore_adamw_per_layer", *GALORE_FLAGS, "--continue_from",
                                            str(tmp_path / "per_layer"),
                                            "--resume_step", "3", "--restore_optimizer"))
    assert update_losses(tmp_path / "resumed") == update_losses(tmp_path / "whole")[3:]
    for name, tensor in weights(whole).items():
        assert torch.equal(weights(resumed)[name], tensor), name


def test_two_ddp_ranks_compute_the_same_projection(tiny_config, tmp_path):
    """DDP all-reduces gradients before the optimizer step, so both ranks take the SVD of the same gradient
    and stay identical; together they match the one-process run on the same batches."""
    dataset = write_long_documents(tmp_path / "docs")
    common = ["--dataset", str(dataset), "--optimizer", "galore_adamw", *GALORE_FLAGS, "--num_training_steps", "3",
              "--total_batch_size", "4"]
    script = tmp_path / "rank_run.py"
    script.write_text(RANK_SCRIPT)
    argv = run_argv(tiny_config, tmp_path / "ddp", *common, "--batch_size", "2")
    returncode, stderr = run_process_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node", "2", str(script), str(tmp_path), *argv])
    assert returncode == 0, stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = peft_pretraining.run(run_argv(tiny_config, tmp_path / "single", *common, "--batch_size", "4"))
    for name, tensor in weights(single).items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], tensor, rtol=1e-4, atol=1e-5)


def parsed(*flags: str, world_size: int = 1):
    args = parse_args(["--model_config", "c.json", "--batch_size", "2", *flags])
    resolve_batch_arithmetic(args, world_size)
    return args


@pytest.mark.parametrize("flags, world_size, message", [
    (["--optimizer", "galore_adamw8bit_per_layer", "--gradient_accumulation", "2"], 1, "no gradient accumulation"),
    (["--optimizer", "q_galore_adamw8bit_per_layer"], 2, "one process"),
    (["--optimizer", "galore_adamw8bit_per_layer", "--grad_clipping", "1.0"], 1, "--grad_clipping"),
    (["--optimizer", "galore_adamw", "--fsdp"], 2, "--fsdp"),
    (["--optimizer", "galore_adamw", "--update_proj_gap", "0"], 1, "--update_proj_gap"),
    (["--optimizer", "galore_adamw", "--rank", "0"], 1, "--rank"),
    (["--optimizer", "galore_adamw8bit", "--optimizer_variant", "corrected"], 1, "--optimizer_variant"),
])
def test_what_galore_cannot_do_is_refused_in_one_line(flags, world_size, message):
    with pytest.raises(ValueError, match=message) as err:
        parsed(*flags, world_size=world_size)
    assert "\n" not in str(err.value)


def test_rank_above_a_matrix_dimension_names_the_shape_and_flag(tiny_config, tmp_path):
    with pytest.raises(Exception, match=r"--rank.*\(64, 64\)"):
        peft_pretraining.run(run_argv(tiny_config, tmp_path, "--optimizer", "galore_adamw", "--rank", "64"))
