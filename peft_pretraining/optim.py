"""The optimizer of a run: parameter groups and constructor arguments, looked up by name in the registry.

Groups follow the reference: one flat group for every optimizer except SPAM, whose attn/mlp matrices form a
second group carrying `density` and `update_proj_gap` (the momentum-reset period lives on that group), and
the GaLore family, whose attn/mlp matrices form a group carrying the projection settings.
"""

import argparse
import inspect
from collections.abc import Callable

import torch
from torch import nn

from galore_torch import OPTIMIZERS, get_optimizer_class


def matrix_param_groups(model: nn.Module, **settings) -> list[dict]:
    """[{everything else}, {weights of nn.Linear modules named *attn*/*mlp*, **settings}] (the reference's)."""
    matrices = [module.weight for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and ("attn" in name or "mlp" in name)
                and module.weight.requires_grad]
    matrix_ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in matrix_ids]
    return [{"params": rest}, {"params": matrices, **settings}]


def spam_param_groups(model: nn.Module, *, density: float, update_proj_gap: int) -> list[dict]:
    """SPAM's: the attn/mlp matrices carry density and update_proj_gap."""
    return matrix_param_groups(model, density=density, update_proj_gap=update_proj_gap)


def galore_param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    """GaLore's: the attn/mlp matrices carry the projection settings (Q-GaLore's too; inert without
    --proj_quant)."""
    return matrix_param_groups(
        model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.galore_scale,
        proj_type=args.proj_type, quant=args.proj_quant, quant_n_bit=args.proj_bits,
        quant_group_size=args.proj_group_size, cos_threshold=args.cos_threshold, gamma_proj=args.gamma_proj,
        queue_size=args.queue_size)


def _momentum_reset_gap(args: argparse.Namespace) -> int:
    return args.update_proj_gap if args.momentum_reset_gap is None else args.momentum_reset_gap


# Per-optimizer constructor arguments beyond lr and weight_decay, keyed by registry name. Adam-type optimizers
# keep their class defaults for betas/eps, as the reference did (--beta1 is SGD's momentum and Adafactor's beta1
# there; Adafactor's other arguments are the reference's fixed ones, spelled out so they cannot drift).
_EXTRA_ARGUMENTS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "sgd": lambda args: {"momentum": args.beta1},
    "adafactor": lambda args: {"beta1": args.beta1, "eps": (1e-30, 1e-3), "clip_threshold": 1.0,
                               "decay_rate": -0.8, "relative_step": False, "scale_parameter": False,
                               "warmup_init": False},
    "galore_adafactor": lambda args: {"beta1": args.beta1, "eps": (1e-30, 1e-3), "clip_threshold": 1.0,
                                      "decay_rate": -0.8},
    "galore_stablespam": lambda args: {"gamma1": args.gamma1, "gamma2": args.gamma2, "gamma3": args.gamma3,
                                       "eta_min": args.eta, "total_T": args.total_T,
                                       "momentum_reset_gap": _momentum_reset_gap(args)},
    "galore_spam": lambda args: {"warmup_epoch": args.warmup_epoch, "threshold": args.threshold,
                                 "grad_accu_steps": args.grad_accu_steps, "density": args.density,
                                 "momentum_reset_gap": _momentum_reset_gap(args)},
    "stablespam": lambda args: {"gamma1": args.gamma1, "gamma2": args.gamma2, "gamma3": args.gamma3,
                                "eta_min": args.eta, "update_proj_gap": args.update_proj_gap,
                                "total_T": args.total_T},
    "spam": lambda args: {"warmup_epoch": args.warmup_epoch, "threshold": args.threshold,
                          "grad_accu_steps": args.grad_accu_steps},
}


# torch's optimizers with a fused (one multi-tensor kernel) step, used under --compile.
_FUSED_OPTIMIZERS = ("adam", "adamw")


def _fast_step_arguments(name: str, optimizer_class: type, compile_run: bool) -> dict:
    """Under --compile: our optimizers' compiled core (`compile=True`), torch's fused Adam/AdamW; the others
    (lion, sgd, adafactor) keep their eager step."""
    if not compile_run:
        return {}
    if "compile" in inspect.signature(optimizer_class).parameters:
        return {"compile": True}
    if name in _FUSED_OPTIMIZERS:
        return {"fused": True}
    return {}


def _takes_variant(optimizer_class: type) -> bool:
    """Whether the optimizer has a `variant` (reference or corrected numerics)."""
    return "variant" in inspect.signature(optimizer_class).parameters


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Construct `--optimizer` over the model's trainable parameters with the flags that apply to it."""
    name = args.optimizer.lower()
    optimizer_class = get_optimizer_class(name)
    if name == "spam":
        params = spam_param_groups(model, density=args.density, update_proj_gap=args.update_proj_gap)
    elif name.startswith(("galore", "q_galore")):
        params = galore_param_groups(model, args)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": args.lr, "weight_decay": args.weight_decay, **_EXTRA_ARGUMENTS.get(name, lambda _: {})(args)}
    kwargs |= _fast_step_arguments(name, optimizer_class, args.compile)
    if _takes_variant(optimizer_class):
        kwargs["variant"] = args.optimizer_variant
    elif args.optimizer_variant != "reference":
        with_variants = [name for name, cls in OPTIMIZERS.items() if _takes_variant(cls)]
        raise ValueError(f"--optimizer_variant {args.optimizer_variant} applies to {' and '.join(with_variants)} "
                         f"only; drop it for --optimizer {args.optimizer}")
    if "state_bits" in inspect.signature(optimizer_class).parameters:
        kwargs["state_bits"] = args.state_bits
    elif args.state_bits != 32:
        raise ValueError(f"--state_bits {args.state_bits} applies to spam and stablespam only (adamw8bit is 8-bit "
                         f"already); drop it for --optimizer {args.optimizer}")
    return optimizer_class(params, **kwargs)
