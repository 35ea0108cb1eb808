"""Simulated low-bit weight and activation quantisation (torch only).

Formats: group-wise INT-b, the reference's 9-level "fp4", and real E2M1-based FP4 (plain, MXFP4, NVFP4);
round-to-nearest-even or stochastic rounding; a straight-through QuantLinear and a model converter.
"""

from quantization.config import FORMATS, REFERENCE_GROUP_SIZE, REFERENCE_TOPK, QuantConfig
from quantization.convert import LLAMA_PROJECTIONS, quantize_linears
from quantization.fake_quant import fake_quantize
from quantization.linear import QuantLinear, quantized_linear
from quantization.reference import reference_configs
from quantization.w4a4 import W4A4_FORMATS

__all__ = [
    "FORMATS",
    "LLAMA_PROJECTIONS",
    "REFERENCE_GROUP_SIZE",
    "REFERENCE_TOPK",
    "QuantConfig",
    "QuantLinear",
    "fake_quantize",
    "quantize_linears",
    "quantized_linear",
    "reference_configs",
    "W4A4_FORMATS",
]
