"""The W4A4 setting of each format: 4-bit weights and activations as the papers train them (weight config,
activation config). One table for the tests, the benchmarks and anyone comparing formats."""

from quantization.config import REFERENCE_GROUP_SIZE, REFERENCE_TOPK, QuantConfig

W4A4_FORMATS: dict[str, tuple[QuantConfig, QuantConfig]] = {
    # The reference's INT4: asymmetric weights, symmetric activations with the top-k outliers kept.
    "int": (
        QuantConfig("int", bits=4, group_size=REFERENCE_GROUP_SIZE, symmetric=False),
        QuantConfig("int", bits=4, group_size=REFERENCE_GROUP_SIZE, symmetric=True, topk=REFERENCE_TOPK),
    ),
    "fp4_ref": (QuantConfig("fp4_ref", topk=REFERENCE_TOPK),) * 2,
    "e2m1": (QuantConfig("e2m1"),) * 2,
    "mxfp4": (QuantConfig("mxfp4"),) * 2,
    "nvfp4": (QuantConfig("nvfp4"),) * 2,
}
