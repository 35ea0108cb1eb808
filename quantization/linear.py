"""`QuantLinear`: an nn.Linear whose weight and input are fake-quantised, with a straight-through backward."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantization.config import FLAT_GROUP_FORMATS, QuantConfig
from quantization.fake_quant import fake_quantize


class _QuantLinearFunction(torch.autograd.Function):
    """y = Q(x) Q(W)^T + b. Backward as in the reference: dx = dy Q(W), dW = dy^T Q(x), db = sum dy; the
    quantisers pass gradients straight through and gradients are not quantised."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_config, activation_config, generator):
        qx = x if activation_config is None else fake_quantize(x, activation_config, generator)
        qw = weight if weight_config is None else fake_quantize(weight, weight_config, generator)
        # Under autocast, cast the quantised operands ourselves so the saved tensors are what the matmul
        # used and the backward matmuls run in the same dtype.
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            qx, qw = qx.to(dtype), qw.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(qx, qw)
        ctx.has_bias = bias is not None
        return F.linear(qx, qw, bias)

    @staticmethod
    def backward(ctx, grad_output):
        qx, qw = ctx.saved_tensors
        grad_output = grad_output.to(qw.dtype)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_output @ qw if ctx.needs_input_grad[0] else None
        grad_weight = flat_grad.t() @ qx.reshape(-1, qx.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_bias = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


def quantized_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_config: QuantConfig | None,
    activation_config: QuantConfig | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional form of `QuantLinear.forward`; with both configs None it is `F.linear`."""
    if weight_config is None and activation_config is None:
        return F.linear(x, weight, bias)
    return _QuantLinearFunction.apply(x, weight, bias, weight_config, activation_config, generator)


class QuantLinear(nn.Linear):
    """nn.Linear with simulated low-bit weights and/or inputs (either config may be None).

    Parameters and state_dict keys are those of the converted layer, so optimizers and checkpoints see no
    difference. A layer converted from a GPT-2-style `Conv1D` keeps that layer's (in, out) weight
    (`transposed_weight`) and quantises its transpose, exactly as the equivalent nn.Linear's weight.
    `generator` (None: the global RNG) drives stochastic rounding; a training loop may set and checkpoint it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_config: QuantConfig | None = None,
        activation_config: QuantConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _check_weight_groups(weight_config, in_features, out_features)
        self.weight_config = weight_config
        self.activation_config = activation_config
        self.generator: torch.Generator | None = None
        self.transposed_weight = False

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        weight_config: QuantConfig | None = None,
        activation_config: QuantConfig | None = None,
    ) -> "QuantLinear":
        """A QuantLinear that owns `linear`'s own Parameter objects (moved, not copied).

        `linear` is an nn.Linear (a QuantLinear included) or a Hugging Face GPT-2-style `Conv1D`.
        """
        transposed = is_conv1d(linear) or getattr(linear, "transposed_weight", False)
        in_features, out_features = linear.weight.shape if transposed else linear.weight.shape[::-1]
        layer = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            device="meta",
            weight_config=weight_config,
            activation_config=activation_config,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.transposed_weight = transposed
        return layer.train(linear.training)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear owning this layer's Parameter objects."""
        if self.transposed_weight:
            raise ValueError("invalid layer: it holds a Conv1D's (in, out) weight, which an nn.Linear cannot "
                             "own; keep the QuantLinear, or build an nn.Linear from weight.t()")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight.t() if self.transposed_weight else self.weight
        return quantized_linear(input, weight, self.bias, self.weight_config, self.activation_config, self.generator)

    def extra_repr(self) -> str:
        configs = f"weight_config={self.weight_config}, activation_config={self.activation_config}"
        transposed = ", transposed_weight=True" if self.transposed_weight else ""
        return f"{super().extra_repr()}, {configs}{transposed}"


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face `Conv1D` (GPT-2's projections: y = x @ W + b, W of shape (in, out)), recognised by its
    class name and `nf` (its output size) so that this package need not import transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and weight.shape[1] == getattr(module, "nf", None))


def _check_weight_groups(config: QuantConfig | None, in_features: int, out_features: int) -> None:
    """Fail at construction, not at the first forward, when flat groups cannot tile the weight."""
    if config is None or config.format not in FLAT_GROUP_FORMATS:
        return
    if (in_features * out_features) % config.group_size:
        raise ValueError(
            f"invalid weight_config.group_size: {config.group_size} does not divide the "
            f"{out_features}x{in_features} weight (pick a divisor of {in_features * out_features})"
        )
