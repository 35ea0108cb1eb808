"""torch.compile gives the same numbers as eager for every deterministic format, and compiles QuantLinear."""

import pytest
import torch
import torch._inductor.config as inductor_config

from quantization import W4A4_FORMATS, QuantLinear, fake_quantize

CONFIGS = tuple(dict.fromkeys(config for pair in W4A4_FORMATS.values() for config in pair))  # each config once


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def every_format(x):
    return [fake_quantize(x, config) for config in CONFIGS]


def test_compiled_fake_quantize_matches_eager_float32():
    compiled_fn = torch.compile(every_format, fullgraph=True)
    gaussian = torch.randn(4, 8, 512, generator=torch.Generator().manual_seed(0))
    # Many ties at the top-k threshold; with the factor 1.1 a tied entry does not quantise to itself.
    ties = torch.randint(-6, 7, (4, 8, 512), generator=torch.Generator().manual_seed(1)) * 1.1
    for x in (gaussian, ties):
        for config, got, expected in zip(CONFIGS, compiled_fn(x), every_format(x)):
            assert torch.equal(got, expected), config


def test_compiled_fake_quantize_matches_eager_bfloat16():
    """int and fp4_ref compute in bfloat16 like the reference; inductor keeps bfloat16 intermediates in
    float32 unless told to emulate the eager casts, so compiled bf16 runs need that flag to agree."""
    torch._dynamo.reset()
    x = torch.randn(4, 8, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    with inductor_config.patch(emulate_precision_casts=True):
        compiled = torch.compile(every_format, fullgraph=True)(x)
    for config, got, expected in zip(CONFIGS, compiled, every_format(x)):
        assert torch.equal(got, expected), config


def test_compiled_quant_linear_matches_eager():
    torch.manual_seed(2)
    layer = QuantLinear(256, 64, weight_config=CONFIGS[0], activation_config=CONFIGS[1])
    x = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(3))
    grads = []
    for module in (layer, torch.compile(layer, fullgraph=True)):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), inputs.grad, layer.weight.grad.clone()))
        layer.weight.grad = layer.bias.grad = None
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)
