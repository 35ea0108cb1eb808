"""`quantize_linears`: swap a model's projection layers for `QuantLinear` and report which ones."""

import warnings
from collections.abc import Iterable

from torch import nn

from quantization.config import QuantConfig
from quantization.linear import QuantLinear, is_conv1d

# The seven LLaMA projections the reference wraps; lm_head, embeddings and norms stay full precision.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_linears(
    model: nn.Module,
    weight_config: QuantConfig | None = None,
    activation_config: QuantConfig | None = None,
    targets: str | Iterable[str] = LLAMA_PROJECTIONS,
    *,
    weight: QuantConfig | None = None,
    activation: QuantConfig | None = None,
) -> list[str]:
    """Replace, in place, every projection named in `targets` by a QuantLinear sharing its parameters; return
    the fully qualified names converted, in module order.

    Args:
        model: any module; nn.Linear layers and Hugging Face GPT-2-style `Conv1D` layers (weight stored
            (in, out)) are converted, other modules are left alone.
        weight_config, activation_config: the formats of the weights and of the layers' inputs; None leaves
            them in full precision (at least one must be given).
        targets: attribute names, matched against the last part of each module's qualified name: one name or
            several, e.g. LLAMA_PROJECTIONS (the default) or ("c_attn", "c_proj", "c_fc") for GPT-2.
        weight, activation: deprecated names of `weight_config` and `activation_config`.
    """
    weight_config = _renamed("weight", weight, "weight_config", weight_config)
    activation_config = _renamed("activation", activation, "activation_config", activation_config)
    if weight_config is None and activation_config is None:
        raise ValueError("invalid weight_config/activation_config: both None (pass at least one QuantConfig)")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    converted = []
    for name, module in list(model.named_modules()):
        parent_name, _, attribute = name.rpartition(".")
        if attribute in targets and (isinstance(module, nn.Linear) or is_conv1d(module)):
            parent = model.get_submodule(parent_name)
            setattr(parent, attribute, QuantLinear.from_linear(module, weight_config, activation_config))
            converted.append(name)
    if not converted:
        raise ValueError(
            f"invalid targets: {targets!r} match no nn.Linear or Conv1D of the model (give the layers' attribute "
            "names, such as 'q_proj' for LLaMA or 'c_attn' for GPT-2)"
        )
    return converted


def _renamed(old_name: str, old_value: QuantConfig | None, new_name: str,
             new_value: QuantConfig | None) -> QuantConfig | None:
    """The value passed under the keyword's old name (with a DeprecationWarning) or its new one."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(f"invalid {old_name}: given together with {new_name}, its new name; pass {new_name} only")
    warnings.warn(f"quantize_linears({old_name}=...) is deprecated; use {new_name}=...", DeprecationWarning,
                  stacklevel=3)
    return old_value
