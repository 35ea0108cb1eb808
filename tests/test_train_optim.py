"""Optimizer construction from the flags: param groups like the reference, and the flags each optimizer takes."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from galore_torch import Adafactor
from peft_pretraining.args import parse_args
from peft_pretraining.optim import build_optimizer, spam_param_groups


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, pad_token_id=None)
    return LlamaForCausalLM(config)


def args_for(*flags: str):
    return parse_args(["--model_config", "configs/llama_9m.json", "--batch_size", "1", "--warmup_steps", "1",
                       "--lr", "0.003", "--weight_decay", "0.01", *flags])


def test_spam_groups_split_attn_and_mlp_matrices(model):
    rest, matrices = spam_param_groups(model, density=0.25, update_proj_gap=7)
    projection_weights = {id(m.weight) for name, m in model.named_modules()
                          if name.endswith(("_proj",)) and isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in matrices["params"]} == projection_weights and len(projection_weights) == 7 * 2
    assert (matrices["density"], matrices["update_proj_gap"]) == (0.25, 7)
    everything = [id(p) for p in model.parameters()]
    assert sorted(everything) == sorted(id(p) for p in rest["params"] + matrices["params"])
    assert id(model.lm_head.weight) in {id(p) for p in rest["params"]}  # lm_head is not in attn/mlp


def test_adam_gets_one_group_with_lr_and_weight_decay_and_default_betas(model):
    optimizer = build_optimizer(model, args_for("--optimizer", "Adam", "--beta1", "0.5"))
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.003, 0.01, (0.9, 0.999))
    assert len(group["params"]) == len(list(model.parameters()))


def test_sgd_momentum_is_beta1_like_the_reference(model):
    optimizer = build_optimizer(model, args_for("--optimizer", "sgd", "--beta1", "0.5"))
    assert optimizer.param_groups[0]["momentum"] == 0.5


def test_adafactor_gets_beta1_and_the_reference_fixed_arguments(model):
    optimizer = build_optimizer(model, args_for("--optimizer", "adafactor", "--beta1", "0.8"))
    assert type(optimizer) is Adafactor and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    expected = {"lr": 0.003, "weight_decay": 0.01, "beta1": 0.8, "eps": (1e-30, 1e-3), "clip_threshold": 1.0,
                "decay_rate": -0.8, "relative_step": False, "scale_parameter": False, "warmup_init": False}
    assert {key: group[key] for key in expected} == expected


def test_unknown_optimizer_lists_the_valid_ones(model):
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(model, args_for("--optimizer", "adamx"))


def test_variant_only_for_optimizers_that_have_one(model):
    with pytest.raises(ValueError, match="--optimizer_variant corrected"):
        build_optimizer(model, args_for("--optimizer", "adamw", "--optimizer_variant", "corrected"))


def test_stablespam_gets_the_reference_flags(model):
    optimizer = build_optimizer(model, args_for("--optimizer", "stablespam", "--gamma1", "0.7", "--gamma2", "0.9",
                                                 "--gamma3", "0.99", "--eta", "0.4", "--total_T", "123",
                                                 "--update_proj_gap", "50", "--optimizer_variant", "corrected"))
    assert len(optimizer.param_groups) == 1  # one flat group, embeddings and norms included
    expected = {"gamma1": 0.7, "gamma2": 0.9, "gamma3": 0.99, "eta_min": 0.4, "total_T": 123,
                "update_proj_gap": 50, "variant": "corrected"}
    assert {key: optimizer.param_groups[0][key] for key in expected} == expected


def test_spam_gets_groups_and_its_flags(model):
    optimizer = build_optimizer(model, args_for("--optimizer", "spam", "--density", "0.5", "--update_proj_gap", "9",
                                                "--warmup_epoch", "11", "--threshold", "300", "--grad_accu_steps", "4"))
    assert len(optimizer.param_groups) == 2
    assert (optimizer.param_groups[1]["density"], optimizer.param_groups[1]["update_proj_gap"]) == (0.5, 9)
    for group in optimizer.param_groups:
        assert (group["warmup_epoch"], group["threshold"], group["grad_accu_steps"]) == (11, 300, 4)
