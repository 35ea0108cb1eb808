"""QuantLinear (straight-through backward, docs/algorithms.md#c5), model conversion, a tiny LLaMA trained per format."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantization import LLAMA_PROJECTIONS, QuantConfig, QuantLinear, fake_quantize, quantize_linears
from quantization import W4A4_FORMATS as W4A4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def seeded(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_linear(in_features=64, out_features=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def plain_forward_backward(x, weight, bias, weight_config, activation_config, grad_output):
    """The reference's QLinear written out: quantised operands forward, STE backward with them."""
    qx = x if activation_config is None else fake_quantize(x, activation_config)
    qw = weight if weight_config is None else fake_quantize(weight, weight_config)
    out = qx @ qw.t() + bias
    flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
    grad_x = grad_output @ qw
    grad_weight = flat_grad.t() @ qx.reshape(-1, qx.shape[-1])
    grad_bias = flat_grad.sum(0)
    return out, grad_x, grad_weight, grad_bias


def run_layer(layer, x, grad_output):
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(grad_output)
    return out, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("name", W4A4)
def test_forward_backward_match_plain_implementation(name):
    weight_config, activation_config = W4A4[name]
    layer = QuantLinear.from_linear(make_linear(), weight_config, activation_config)
    x, grad_output = seeded(4, 8, 64, seed=1), seeded(4, 8, 48, seed=2)
    got = run_layer(layer, x, grad_output)
    expected = plain_forward_backward(x, layer.weight.detach(), layer.bias.detach(), *W4A4[name], grad_output)
    for actual, wanted in zip(got, expected):
        torch.testing.assert_close(actual, wanted)
    assert not torch.allclose(got[0], F.linear(x, layer.weight, layer.bias))  # it does quantise


@pytest.mark.parametrize("which", ["weight", "activation", "neither"])
def test_either_config_may_be_none(which):
    weight_config, activation_config = W4A4["int"]
    weight_config = weight_config if which == "weight" else None
    activation_config = activation_config if which == "activation" else None
    layer = QuantLinear.from_linear(make_linear(), weight_config, activation_config)
    x, grad_output = seeded(4, 8, 64, seed=3), seeded(4, 8, 48, seed=4)
    got = run_layer(layer, x, grad_output)
    expected = plain_forward_backward(
        x, layer.weight.detach(), layer.bias.detach(), weight_config, activation_config, grad_output
    )
    for actual, wanted in zip(got, expected):
        torch.testing.assert_close(actual, wanted)


def test_activation_settings_are_per_layer():
    """The reference kept them as class attributes: the last layer built decided for all."""
    four_bit = QuantLinear.from_linear(make_linear(), activation_config=QuantConfig("int", bits=4, topk=2))
    QuantLinear.from_linear(make_linear(), activation_config=QuantConfig("int", bits=8, topk=2))
    x = seeded(4, 8, 64, seed=5)
    expected = F.linear(fake_quantize(x, QuantConfig("int", bits=4, topk=2)), four_bit.weight, four_bit.bias)
    torch.testing.assert_close(four_bit(x), expected)


def test_without_bias():
    weight_config, activation_config = W4A4["mxfp4"]
    layer = QuantLinear.from_linear(make_linear(bias=False), weight_config, activation_config)
    x = seeded(4, 8, 64, seed=6).requires_grad_()
    out = layer(x)
    out.sum().backward()
    expected = F.linear(fake_quantize(x, activation_config), fake_quantize(layer.weight, weight_config))
    torch.testing.assert_close(out, expected)
    assert layer.bias is None and layer.weight.grad is not None


def test_from_linear_and_to_linear_move_the_same_parameters():
    linear = make_linear().train(False)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    layer = QuantLinear.from_linear(linear, *W4A4["int"])
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.training
    assert list(layer.state_dict()) == list(linear.state_dict())
    layer(seeded(4, 8, 64, seed=7)).sum().backward()
    before = linear.weight.detach().clone()
    optimizer.step()  # the optimizer built on the nn.Linear updates the QuantLinear
    assert not torch.equal(layer.weight, before)
    back = layer.to_linear()
    assert type(back) is nn.Linear
    assert back.weight is linear.weight and back.bias is linear.bias and not back.training


def test_weight_group_size_checked_at_conversion():
    with pytest.raises(ValueError, match="weight_config.group_size"):
        QuantLinear.from_linear(make_linear(64, 50), weight_config=QuantConfig("int", group_size=256))


def test_generator_makes_stochastic_rounding_reproducible():
    config = QuantConfig("int", topk=2, stochastic=True)
    layer = QuantLinear.from_linear(make_linear(), activation_config=config)
    x = seeded(4, 8, 64, seed=8)
    outputs = []
    for _ in range(2):
        layer.generator = torch.Generator().manual_seed(3)
        outputs.append(layer(x))
    assert torch.equal(*outputs)
    layer.generator = torch.Generator().manual_seed(4)
    assert not torch.equal(layer(x), outputs[0])


def test_autocast_bfloat16_forward_and_backward():
    weight_config, activation_config = W4A4["fp4_ref"]
    layer = QuantLinear.from_linear(make_linear(), weight_config, activation_config)
    x = seeded(4, 8, 64, seed=9).requires_grad_()
    grad_output = seeded(4, 8, 48, seed=10, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.backward(grad_output)
    assert out.dtype == torch.bfloat16
    assert x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    qx = fake_quantize(x.detach(), activation_config).bfloat16()
    qw = fake_quantize(layer.weight.detach(), weight_config).bfloat16()
    torch.testing.assert_close(out, F.linear(qx, qw, layer.bias.detach().bfloat16()))
    torch.testing.assert_close(x.grad, (grad_output @ qw).float())
    flat_grad = grad_output.reshape(-1, 48)
    torch.testing.assert_close(layer.weight.grad, (flat_grad.t() @ qx.reshape(-1, 64)).float())


# ---- conversion of a tiny LLaMA ---------------------------------------------------------------------------

def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def test_quantize_linears_converts_exactly_the_seven_projections():
    model = tiny_llama()
    keys = list(model.state_dict())
    parameters = {id(p) for p in model.parameters()}
    converted = quantize_linears(model, *W4A4["int"])
    expected = [
        f"model.layers.{i}.{block}.{name}"
        for i in range(2)
        for block, names in (("self_attn", LLAMA_PROJECTIONS[:4]), ("mlp", LLAMA_PROJECTIONS[4:]))
        for name in names
    ]
    assert sorted(converted) == sorted(expected)
    assert all(isinstance(model.get_submodule(name), QuantLinear) for name in expected)
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert list(model.state_dict()) == keys
    assert {id(p) for p in model.parameters()} == parameters


def test_quantize_linears_rejects_targets_that_match_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match="targets"):
        quantize_linears(model, *W4A4["int"], targets=("qkv_proj",))
    with pytest.raises(ValueError, match="weight_config/activation_config"):
        quantize_linears(model)


def test_quantize_linears_keywords_match_from_linear_and_old_names_are_deprecated():
    weight_config, activation_config = W4A4["int"]
    model = tiny_llama()
    quantize_linears(model, weight_config=weight_config, activation_config=activation_config)
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.weight_config, layer.activation_config) == (weight_config, activation_config)
    old_style = tiny_llama()
    with pytest.warns(DeprecationWarning, match="weight_config"):
        quantize_linears(old_style, weight=weight_config, activation=activation_config)
    layer = old_style.model.layers[0].self_attn.q_proj
    assert (layer.weight_config, layer.activation_config) == (weight_config, activation_config)
    with pytest.raises(ValueError, match="invalid weight: given together with weight_config"):
        quantize_linears(tiny_llama(), weight=weight_config, weight_config=weight_config)


# ---- GPT-2's Conv1D (y = x @ W + b, W stored (in, out)) ------------------------------------------------

def make_conv1d(in_features=64, out_features=48, seed=0):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(seed)
    conv = pytorch_utils.Conv1D(out_features, in_features)
    nn.init.normal_(conv.bias)
    return conv


def test_conv1d_becomes_a_quant_linear_keeping_its_weight():
    conv = make_conv1d()
    layer = QuantLinear.from_linear(conv)
    assert layer.weight is conv.weight and layer.bias is conv.bias and layer.transposed_weight
    assert (layer.in_features, layer.out_features) == (64, 48)
    assert list(layer.state_dict()) == list(conv.state_dict())
    x = seeded(4, 8, 64, seed=1)
    torch.testing.assert_close(layer(x), conv(x))  # no quantisation: the float layer
    with pytest.raises(ValueError, match="Conv1D"):
        layer.to_linear()


@pytest.mark.parametrize("name", W4A4)
def test_quantized_conv1d_matches_the_equivalent_nn_linear(name):
    """Forward and straight-through backward bitwise equal to an nn.Linear holding weight.t(); the Conv1D's
    weight gets the transposed gradient."""
    conv = make_conv1d()
    linear = make_linear()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    x, grad_output = seeded(4, 8, 64, seed=2), seeded(4, 8, 48, seed=3)
    from_conv = run_layer(QuantLinear.from_linear(conv, *W4A4[name]), x, grad_output)
    from_linear = run_layer(QuantLinear.from_linear(linear, *W4A4[name]), x, grad_output)
    assert torch.equal(from_conv[0], from_linear[0]) and torch.equal(from_conv[1], from_linear[1])
    assert torch.equal(from_conv[2], from_linear[2].t()) and torch.equal(from_conv[3], from_linear[3])


def train_on_one_batch(model: nn.Module, steps: int) -> list[float]:
    """AdamW on one fixed batch of token ids below 128; the loss of every step."""
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def tiny_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def test_quantize_linears_converts_gpt2_conv1d_projections():
    model = tiny_gpt2()
    keys, parameters = list(model.state_dict()), {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="'c_attn' for GPT-2"):
        quantize_linears(model, *W4A4["nvfp4"])  # the LLaMA names match nothing here
    converted = quantize_linears(model, *W4A4["nvfp4"], targets=("c_attn", "c_proj", "c_fc"))
    assert converted == [f"transformer.h.{i}.{block}" for i in range(2)
                         for block in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert type(model.lm_head) is nn.Linear
    assert list(model.state_dict()) == keys and {id(p) for p in model.parameters()} == parameters
    losses = train_on_one_batch(model, steps=15)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", W4A4)
def test_tiny_llama_trains_with_each_format(name):
    model = tiny_llama(seed=1)
    quantize_linears(model, *W4A4[name])
    losses = train_on_one_batch(model, steps=30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
