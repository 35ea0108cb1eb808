"""The model of a run: reference configs build with the published parameter counts, the transformers-5 traps are
mapped, the tokenizer is checked against the vocab, and the quantization flags become the right configs."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from peft_pretraining.args import parse_args
from peft_pretraining.model import (
    apply_tokenizer,
    build_model,
    count_parameters,
    load_llama_config,
    quant_configs_from_args,
)
from quantization import QuantLinear

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# docs/algorithms.md#e: total parameters (M) of every reference config
SPEC_PARAMS_M = {"9m": 9.00, "20m": 19.55, "35m": 35.20, "40m": 42.39, "60m": 58.07, "71m": 70.58,
                 "100m": 100.12, "130m": 134.11, "250m": 247.37, "350m": 367.97, "1b": 1339.08,
                 "3b": 2685.83, "7b": 6738.42}


def test_every_config_is_covered():
    assert sorted(p.stem.removeprefix("llama_") for p in CONFIGS.glob("llama_*.json")) == sorted(SPEC_PARAMS_M)


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS_M))
def test_config_builds_with_spec_parameter_count(name):
    config = load_llama_config(CONFIGS / f"llama_{name}.json", max_length=256)
    model, quantized = build_model(config, dtype="float32", device=torch.device("meta"))
    total, trainable = count_parameters(model)
    assert round(total / 1e6, 2) == SPEC_PARAMS_M[name]
    assert trainable == total and quantized == []


def test_reference_json_traps_are_mapped():
    config = load_llama_config(CONFIGS / "llama_130m.json", max_length=256)
    assert config.max_position_embeddings == 1024  # from max_sequence_length
    assert config.pad_token_id is None  # -1 would freeze embedding row 31999
    assert config._attn_implementation == "sdpa"
    model, _ = build_model(config, dtype="float32", device=torch.device("meta"))
    assert model.model.embed_tokens.padding_idx is None


def test_config_errors_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model_config"):
        load_llama_config(tmp_path / "missing.json", max_length=256)
    malformed = tmp_path / "bad.json"
    malformed.write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="--model_config .*not valid JSON"):
        load_llama_config(malformed, max_length=256)
    with pytest.raises(ValueError, match="--max_length 2048"):
        load_llama_config(CONFIGS / "llama_9m.json", max_length=2048)


class FakeTokenizer:
    """The few tokenizer attributes the vocab check reads."""

    def __init__(self, tokens: list[str], bos=None, eos=1, pad=0):
        self.tokens = tokens
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def tiny_config(tmp_path, vocab_size: int = 100):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "vocab_size": vocab_size, "max_sequence_length": 64,
                                "pad_token_id": -1, "bos_token_id": 0, "eos_token_id": 1, "model_type": "llama"}))
    return load_llama_config(path, max_length=64)


def test_tokenizer_special_ids_go_into_the_config(tmp_path):
    config = tiny_config(tmp_path)
    apply_tokenizer(config, FakeTokenizer([f"t{i}" for i in range(100)], bos=5, eos=7, pad=3))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (5, 7, None)


def test_t5_sentinels_past_the_vocab_only_warn(tmp_path):
    config = tiny_config(tmp_path)
    t5_like = FakeTokenizer([f"t{i}" for i in range(100)] + [f"<extra_id_{i}>" for i in range(3)])
    with pytest.warns(UserWarning, match="sentinels"):
        apply_tokenizer(config, t5_like)


def test_tokenizer_larger_than_the_vocab_is_an_error(tmp_path):
    config = tiny_config(tmp_path)
    with pytest.raises(ValueError, match="--tokenizer has 101 ids"):
        apply_tokenizer(config, FakeTokenizer([f"t{i}" for i in range(101)]))
    with pytest.raises(ValueError, match="--tokenizer pad id 100"):
        apply_tokenizer(config, FakeTokenizer([f"t{i}" for i in range(100)], pad=100))


def quant_args(*flags: str):
    return parse_args(["--model_config", "configs/llama_9m.json", "--batch_size", "1", "--warmup_steps", "1",
                       *flags])


def test_fp4_flag_is_the_reference_fp4_for_weights_and_activations():
    weight, act = quant_configs_from_args(quant_args("--fp4", "--weight_group_size", "256"))
    for config in (weight, act):
        assert (config.format, config.group_size, config.topk) == ("fp4_ref", 256, 2)


def test_seed_int4_command_quantization():
    weight, act = quant_configs_from_args(quant_args("--act_quant", "--weight_bits", "4", "--weight_group_size",
                                                     "256", "--act_group_size", "64", "--act_stochastic"))
    assert (weight.format, weight.bits, weight.group_size, weight.symmetric, weight.stochastic) == \
        ("int", 4, 256, False, False)
    assert (act.format, act.bits, act.group_size, act.symmetric, act.topk, act.stochastic) == \
        ("int", 4, 64, True, 2, True)


def test_act_quant_defaults_reproduce_the_reference():
    weight, act = quant_configs_from_args(quant_args("--act_quant", "--stochastic_round"))
    assert (weight.bits, weight.group_size) == (8, 256)
    assert (act.bits, act.group_size, act.topk, act.stochastic) == (8, 256, 2, True)


def test_no_quantization_flags_no_quantization():
    assert quant_configs_from_args(quant_args()) == (None, None)


def test_explicit_formats():
    weight, act = quant_configs_from_args(quant_args("--weight_format", "nvfp4", "--act_format", "mxfp4"))
    assert (weight.format, weight.group_size, act.format, act.group_size, act.topk) == ("nvfp4", 16, "mxfp4", 32, 0)
    weight, act = quant_configs_from_args(quant_args("--weight_format", "int", "--weight_bits", "4"))
    assert (weight.format, weight.bits, weight.symmetric, act) == ("int", 4, False, None)


def test_explicit_format_errors_name_the_flag():
    with pytest.raises(ValueError, match="--weight_format mxfp4"):
        quant_configs_from_args(quant_args("--weight_format", "mxfp4", "--weight_group_size", "64"))


def test_quantized_bf16_model_keeps_lm_head_and_state_dict_keys(tmp_path):
    config = tiny_config(tmp_path)
    plain, _ = build_model(config, dtype="bfloat16", device=torch.device("cpu"))
    weight, act = quant_configs_from_args(quant_args("--act_quant", "--weight_bits", "4", "--weight_group_size", "64",
                                                     "--act_group_size", "64"))
    model, quantized = build_model(config, dtype="bfloat16", device=torch.device("cpu"), weight_quant=weight,
                                   act_quant=act)
    assert len(quantized) == 7 * 2 and all(isinstance(model.get_submodule(n), QuantLinear) for n in quantized)
    assert type(model.lm_head) is nn.Linear
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_same_seed_same_init(tmp_path):
    config = tiny_config(tmp_path)
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(build_model(config, dtype="float32", device=torch.device("cpu"))[0])
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True))
    assert models[0].model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_activation_checkpointing_flag_enables_it(tmp_path):
    config = tiny_config(tmp_path)
    assert build_model(config, dtype="float32", device=torch.device("cpu"),
                       activation_checkpointing=True)[0].is_activation_checkpointing
    assert not build_model(config, dtype="float32", device=torch.device("cpu"))[0].is_activation_checkpointing
