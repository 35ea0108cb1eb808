"""The reference CLI's quantisation flags as configs (docs/algorithms.md#c1: what its flags effectively did)."""

from quantization.config import REFERENCE_GROUP_SIZE, REFERENCE_TOPK, QuantConfig


def reference_configs(
    act_quant: bool, fp4: bool, weight_bits: int, weight_group_size: int, stochastic_round: bool
) -> tuple[QuantConfig | None, QuantConfig | None]:
    """(weight_config, activation_config) for the reference flags `--act_quant`, `--fp4`, `--weight_bits`,
    `--weight_group_size`, `--stochastic_round`.

    --fp4 wins over --act_quant (the reference replaces its INT layers by FP4 ones) and ignores bits, group
    size and stochastic rounding; --act_quant gives INT weights (asymmetric) and INT activations (symmetric,
    top-2 kept, stochastic iff --stochastic_round), both with --weight_bits and --weight_group_size (the
    --act_* flags were dead). Neither flag: nothing is quantised.
    """
    if fp4:
        config = QuantConfig("fp4_ref", bits=4, group_size=REFERENCE_GROUP_SIZE, topk=REFERENCE_TOPK)
        return config, config
    if act_quant:
        weight = QuantConfig("int", bits=weight_bits, group_size=weight_group_size, symmetric=False)
        activation = QuantConfig(
            "int",
            bits=weight_bits,
            group_size=weight_group_size,
            symmetric=True,
            topk=REFERENCE_TOPK,
            stochastic=stochastic_round,
        )
        return weight, activation
    return None, None
