"""The cost figures of an update line: FLOPs per token from the config, MFU against a peak, peak memory."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import peft_pretraining
from peft_pretraining.args import parse_args
from peft_pretraining.model import load_llama_config
from peft_pretraining.throughput import (
    PEAK_BF16_TFLOPS,
    model_flops_per_token,
    non_embedding_parameters,
    peak_memory_gb,
    peak_tflops,
    throughput_values,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["llama_9m", "llama_60m", "llama_350m", "llama_1b", "llama_7b"])
def test_non_embedding_parameters_match_the_built_model(name):
    config = load_llama_config(REPO / "configs" / f"{name}.json", max_length=256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert non_embedding_parameters(config) == total - model.model.embed_tokens.weight.numel()


def test_flops_per_token_is_six_n_plus_the_attention_term():
    config = load_llama_config(REPO / "configs" / "llama_60m.json", max_length=256)
    n = non_embedding_parameters(config)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    assert model_flops_per_token(config, 256) == 6 * n + 12 * layers * hidden * 256
    assert model_flops_per_token(config, 512) - model_flops_per_token(config, 256) == 12 * layers * hidden * 256


def test_peak_tflops_override_and_cpu():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5
    assert dict(PEAK_BF16_TFLOPS)["H100"] == 989.0 and dict(PEAK_BF16_TFLOPS)["A100"] == 312.0
    names = [name for name, _ in PEAK_BF16_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")  # the specific name is matched first


def test_throughput_values_arithmetic():
    values = throughput_values(positions=1000, seconds=0.5, world_size=4, flops_per_token=1e9, peak=10.0)
    assert values["tokens_per_s"] == 8000  # all ranks
    assert values["tflops"] == pytest.approx(1e9 * 2000 / 1e12)  # per device
    assert values["mfu"] == pytest.approx(values["tflops"] / 10.0)
    assert "mfu" not in throughput_values(positions=1, seconds=1, world_size=1, flops_per_token=1, peak=None)


def test_peak_memory_grows_with_a_large_allocation():
    before = peak_memory_gb(torch.device("cpu"))
    block = torch.ones(64 * 2**20)  # 256 MB, touched
    assert peak_memory_gb(torch.device("cpu")) >= max(before, block.numel() * 4 / 1e9)


def test_peak_tflops_flag_logs_mfu(tiny_config, tmp_path):
    peft_pretraining.run(["--model_config", str(tiny_config), "--dataset", "sample", "--batch_size", "2",
                          "--max_length", "32", "--num_training_steps", "2", "--warmup_steps", "1",
                          "--eval_tokens", "32", "--workers", "0", "--unset_wandb", "--peak_tflops", "0.5",
                          "--save_dir", str(tmp_path)])
    updates = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    assert len(updates) == 2
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 0.5) for r in updates)


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_bad_peak_tflops_is_refused(tiny_config, value):
    with pytest.raises(ValueError, match=f"--peak_tflops {value}"):
        parse_args(["--model_config", str(tiny_config), "--batch_size", "2", "--peak_tflops", value])
