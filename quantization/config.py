"""One frozen, validated description of a simulated low-bit format (what to quantise to, not how)."""

from dataclasses import dataclass
from typing import Literal, get_args

Format = Literal["int", "fp4_ref", "e2m1", "mxfp4", "nvfp4"]
FORMATS: tuple[str, ...] = get_args(Format)

# Formats whose scale groups are contiguous runs of the flattened tensor (the reference's `view(-1, g)`);
# the others use blocks along the last (reduction) dimension, as hardware block formats do.
FLAT_GROUP_FORMATS = ("int", "fp4_ref")

# The reference's group size and kept outliers (largest-|x| entries per group) for its INT and "FP4" paths.
REFERENCE_GROUP_SIZE = 256
REFERENCE_TOPK = 2
# The natural group/block size of each format: the reference's for its INT and "FP4" paths, the OCP MX
# block of 32 (also used for plain E2M1 with an fp32 scale), and the NVFP4 block of 16.
DEFAULT_GROUP_SIZE = {"int": REFERENCE_GROUP_SIZE, "fp4_ref": REFERENCE_GROUP_SIZE, "e2m1": 32, "mxfp4": 32,
                      "nvfp4": 16}
# Block sizes fixed by the format's definition.
REQUIRED_GROUP_SIZE = {"mxfp4": 32, "nvfp4": 16}

INT_BITS_RANGE = (2, 8)  # codes are stored conceptually in int8/uint8


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one fake quantiser.

    Args:
        format: "int" (group-wise integer), "fp4_ref" (the reference's 9-level "FP4" grid), "e2m1" (real FP4
            with an fp32 abs-max scale per block), "mxfp4" (OCP MX: E2M1, block 32, power-of-two scale) or
            "nvfp4" (E2M1, block 16, E4M3 block scale and an fp32 per-tensor scale).
        bits: code width; 2..8 for "int", 4 for the FP4 formats.
        group_size: elements sharing one scale; None picks the format's natural size (DEFAULT_GROUP_SIZE).
        symmetric: "int" only: False = asymmetric min-max with a zero point (the reference's weights),
            True = abs-max (the reference's activations). The FP4 formats are symmetric by construction.
        topk: largest-magnitude entries of each group kept exact ("int" symmetric and "fp4_ref"; the
            reference keeps 2 for activations and for "fp4").
        stochastic: unbiased stochastic rounding instead of round-to-nearest-even.
    """

    format: Format = "int"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    topk: int = 0
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"invalid format: {self.format!r} (choose one of {', '.join(FORMATS)})")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.format])
        _validate_bits(self.format, self.bits)
        _validate_group_size(self.format, self.group_size)
        _validate_flag(self.symmetric, "symmetric")
        _validate_flag(self.stochastic, "stochastic")
        if self.format != "int" and not self.symmetric:
            raise ValueError("invalid symmetric: False (only format 'int' has an asymmetric variant)")
        _validate_topk(self)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_bits(fmt: str, bits: int) -> None:
    if fmt == "int":
        low, high = INT_BITS_RANGE
        if not _is_int(bits) or not low <= bits <= high:
            raise ValueError(f"invalid bits: {bits!r} (format 'int' needs an integer in [{low}, {high}])")
    elif bits != 4 or not _is_int(bits):
        raise ValueError(f"invalid bits: {bits!r} (format {fmt!r} is a 4-bit format; use bits=4)")


def _validate_group_size(fmt: str, group_size: int) -> None:
    if not _is_int(group_size) or group_size <= 0:
        raise ValueError(f"invalid group_size: {group_size!r} (must be a positive integer)")
    required = REQUIRED_GROUP_SIZE.get(fmt)
    if required is not None and group_size != required:
        raise ValueError(f"invalid group_size: {group_size} (format {fmt!r} uses blocks of {required})")


def _validate_flag(value: bool, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"invalid {name}: {value!r} (must be True or False)")


def _validate_topk(config: QuantConfig) -> None:
    if not _is_int(config.topk) or config.topk < 0:
        raise ValueError(f"invalid topk: {config.topk!r} (must be an integer >= 0)")
    if config.topk == 0:
        return
    supports_topk = config.format == "fp4_ref" or (config.format == "int" and config.symmetric)
    if not supports_topk:
        raise ValueError(
            f"invalid topk: {config.topk} (only format 'fp4_ref' and symmetric 'int' keep outliers; use 0)"
        )
    if config.topk >= config.group_size:
        raise ValueError(f"invalid topk: {config.topk} (must be smaller than group_size={config.group_size})")
