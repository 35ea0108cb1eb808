"""QuantConfig validation and the reference-flag mapping (docs/algorithms.md#c1)."""

import pytest

from quantization import FORMATS, QuantConfig, reference_configs


def test_natural_group_sizes():
    assert {fmt: QuantConfig(fmt).group_size for fmt in FORMATS} == {
        "int": 256,
        "fp4_ref": 256,
        "e2m1": 32,
        "mxfp4": 32,
        "nvfp4": 16,
    }


def test_config_is_frozen_and_hashable():
    config = QuantConfig("int", topk=2)
    with pytest.raises(AttributeError):
        config.bits = 8
    assert config == QuantConfig("int", group_size=256, topk=2)
    assert len({config, QuantConfig("int", group_size=256, topk=2)}) == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"format": "mxfp4", "bits": 8}, "bits"),
        ({"format": "int8"}, "format"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -32}, "group_size"),
        ({"format": "mxfp4", "group_size": 64}, "group_size"),
        ({"format": "nvfp4", "group_size": 32}, "group_size"),
        ({"topk": -1}, "topk"),
        ({"topk": 256}, "topk"),
        ({"symmetric": False, "topk": 2}, "topk"),
        ({"format": "e2m1", "topk": 2}, "topk"),
        ({"format": "fp4_ref", "symmetric": False}, "symmetric"),
        ({"stochastic": 1}, "stochastic"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^invalid {field}:"):
        QuantConfig(**kwargs)


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        QuantConfig("fp8")
    for fmt in FORMATS:
        assert fmt in str(err.value)


def test_reference_int_path():
    weight, activation = reference_configs(
        act_quant=True, fp4=False, weight_bits=4, weight_group_size=128, stochastic_round=True
    )
    assert weight == QuantConfig("int", bits=4, group_size=128, symmetric=False, topk=0, stochastic=False)
    assert activation == QuantConfig("int", bits=4, group_size=128, symmetric=True, topk=2, stochastic=True)
    _, deterministic = reference_configs(True, False, 8, 256, stochastic_round=False)
    assert deterministic == QuantConfig("int", bits=8, group_size=256, symmetric=True, topk=2)


@pytest.mark.parametrize("act_quant", [False, True])
def test_reference_fp4_path_wins_and_ignores_int_flags(act_quant):
    weight, activation = reference_configs(
        act_quant=act_quant, fp4=True, weight_bits=8, weight_group_size=64, stochastic_round=True
    )
    expected = QuantConfig("fp4_ref", bits=4, group_size=256, topk=2, stochastic=False)
    assert weight == expected and activation == expected


def test_reference_without_flags_quantises_nothing():
    assert reference_configs(False, False, 4, 256, True) == (None, None)
