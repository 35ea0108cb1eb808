"""`quantize_linears`: swap a model's projection layers for `QuantLinear` and report which ones."""

from collections.abc import Iterable

from torch import nn

from quantization.config import QuantConfig
from quantization.linear import QuantLinear

# The seven LLaMA projections the reference wraps; lm_head, embeddings and norms stay full precision.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_linears(
    model: nn.Module,
    weight: QuantConfig | None = None,
    activation: QuantConfig | None = None,
    targets: Iterable[str] = LLAMA_PROJECTIONS,
) -> list[str]:
    """Replace, in place, every nn.Linear whose attribute name is in `targets` by a QuantLinear sharing its
    parameters; return the fully qualified names converted, in module order."""
    if weight is None and activation is None:
        raise ValueError("invalid weight/activation: both None (pass at least one QuantConfig)")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    converted = []
    for name, module in list(model.named_modules()):
        parent_name, _, attribute = name.rpartition(".")
        if attribute in targets and isinstance(module, nn.Linear):
            parent = model.get_submodule(parent_name)
            setattr(parent, attribute, QuantLinear.from_linear(module, weight, activation))
            converted.append(name)
    if not converted:
        raise ValueError(
            f"invalid targets: {targets!r} match no nn.Linear of the model (give names such as 'q_proj')"
        )
    return converted
