"""Gradient-spike monitoring on the device: SPAM's Gradient Spike Score.

The Gradient Spike Score of SPAM (arXiv 2501.06842) of one gradient element is its magnitude over the mean
magnitude of that element so far, the current step included:

    GSS(g_i) = |g_i| / mean_j |g_i^(j)|        a spike is GSS > 50 (the paper's Fig. 2)

Here the mean runs over the *observed* steps: with `every=k` the monitor looks at steps k, 2k, 3k, ... and
both the numerator and the running mean use only those steps (a spike on an unobserved step is not seen at
all). Because the current step is part of the mean, GSS <= the number of observations of that tensor, so a
threshold of 50 can fire only from the 51st observation on (step 51*k). The first observation scores every
nonzero element exactly 1; an element whose running mean is 0 scores 0.

Use in the training loop (the values stay 0-dim device tensors; convert them to floats together with the
loop's other logged values, one host sync per update; the optimizers' own statistics come from their
`metrics()`, not from here):

    monitor = GradientSpikeMonitor(model.named_parameters(), threshold=50.0, every=10)
    ...                                         # backward of the update's last micro-batch
    spikes = monitor.observe(step)              # step: the 1-based number this update is logged under;
                                                # {} unless step % every == 0. Before clipping.
    ...                                         # clip, optimizer.step()
    names, values = list(spikes), torch.stack([v.float() for v in spikes.values()]).tolist()
    checkpoint["spike_monitor"] = monitor.state_dict()          # and monitor.load_state_dict(...) on resume

Call `observe` after gradients are complete (DDP: after the all-reduce of the last micro-batch) and before
gradient clipping, which rewrites `p.grad` in place; skip it on updates whose gradients are not finite, since
a NaN/inf would stay in that element's running mean for the rest of the run.
Meant for plain (or DDP-replicated) parameters; FSDP2's sharded DTensor parameters are untested.

Memory: one float32 buffer per monitored tensor, i.e. 4 bytes per monitored parameter element (LLaMA-130M:
0.54 GB, LLaMA-1B: 5.4 GB) whatever the parameter dtype, plus one float32 work buffer kept between
observations, the size of the largest monitored tensor (LLaMA-1B's embedding: 0.26 GB); fresh full-size
temporaries would cost more than the arithmetic on CPU (page faults).
`matrices_only=True` leaves out the 1-D norm weights (a negligible saving for LLaMA, whose parameters are
almost all matrices; it mainly drops the `norm` key).
Time: seven light elementwise passes over each monitored tensor per observation (|g|, add to the sum,
divide, max, threshold, sign, sum), in place: about 2x cheaper than the obvious ten passes with
fresh temporaries; `every` amortises them.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# Parameter-name components that identify a layer type; the first match wins, anything else is "other".
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
               "lm_head")
NORM_TYPE = "norm"
OTHER_TYPE = "other"
DEFAULT_THRESHOLD = 50.0
# The running sums start at the smallest normal float32 instead of 0, so an element whose gradient has always
# been 0 scores 0/tiny = 0 (not 0/0) without a clamping pass; any |g| above ~1e-31 absorbs it exactly.
_TINY = torch.finfo(torch.float32).tiny


def layer_type(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj'; '...input_layernorm.weight' -> 'norm'.

    Matches whole dotted components, so wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`) do
    not matter."""
    components = name.split(".")
    for candidate in LAYER_TYPES:
        if candidate in components:
            return candidate
    if any(component.endswith(NORM_TYPE) for component in components):
        return NORM_TYPE
    return OTHER_TYPE


@dataclass
class _Tracked:
    """One monitored parameter: its running sum of |g| (float32, on the param's device, starting at _TINY)
    and how many observations went into it (a host int: counting needs no device work)."""
    param: torch.Tensor
    layer_type: str
    abs_sum: torch.Tensor
    observations: int = 0


class GradientSpikeMonitor:
    """Counts gradient elements whose Gradient Spike Score exceeds `threshold`, per layer type.

    Args:
        named_parameters: (name, parameter) pairs, e.g. `model.named_parameters()`; parameters that do not
            require grad or are empty are ignored.
        threshold: an element is a spike when its GSS exceeds this (SPAM's figures use 50).
        every: observe only update steps that are multiples of this (the running mean is over those steps).
        matrices_only: monitor only 2-D parameters (skips norm weights and biases).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], *,
                 threshold: float = DEFAULT_THRESHOLD, every: int = 1, matrices_only: bool = False):
        if not threshold > 0:
            raise ValueError(f"threshold={threshold}: must be positive (SPAM uses 50)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: must be an integer >= 1 (observe every N update steps)")
        self.threshold = float(threshold)
        self.every = every
        self._tracked: dict[str, _Tracked] = {}
        for name, param in named_parameters:
            if not param.requires_grad or param.numel() == 0 or (matrices_only and param.dim() != 2):
                continue
            self._tracked[name] = _Tracked(param=param, layer_type=layer_type(name),
                                           abs_sum=torch.full_like(param, _TINY, dtype=torch.float32))
        if not self._tracked:
            raise ValueError("no parameter to monitor: pass model.named_parameters() of a model with trainable "
                             "parameters (2-D ones with matrices_only=True)")
        self._device = next(iter(self._tracked.values())).abs_sum.device
        self.layer_types = sorted({tracked.layer_type for tracked in self._tracked.values()})
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def is_due(self, step: int) -> bool:
        """Whether `observe(step)` will look at the gradients."""
        return step % self.every == 0

    @torch.no_grad()
    def observe(self, step: int) -> dict[str, torch.Tensor]:
        """Score the current gradients if `step` is due; returns 0-dim float32 device tensors.

        Keys: `spikes/<layer type>` for every monitored type, `spikes/total`, and `gss_max` (the largest
        score of any element). Returns {} when the step is not due or no monitored parameter has a gradient.
        Never synchronises with the device.
        """
        if not self.is_due(step):
            return {}
        counts: dict[str, list[torch.Tensor]] = {kind: [] for kind in self.layer_types}
        maxima = []
        for tracked in self._tracked.values():
            grad = tracked.param.grad
            if grad is None:
                continue
            tracked.observations += 1
            relative = self._scratch(tracked)
            if grad.dtype == torch.float32:
                torch.abs(grad.detach(), out=relative)
            else:
                relative.copy_(grad.detach()).abs_()
            tracked.abs_sum.add_(relative)
            # |g| / sum|g| = GSS / observations: scaling the threshold and the maximum (on 0-dim values) instead
            # of every score saves a pass over the gradient.
            relative.div_(tracked.abs_sum)
            maxima.append(relative.amax().mul_(tracked.observations).to(self._device))
            # Count the scores above the threshold without a bool temporary (slower to write and sum on CPU):
            # zero the others, map the rest (all > 0) to 1, add up. Exact for up to 2**24 spikes per tensor.
            torch.threshold_(relative, self.threshold / tracked.observations, 0.0)
            counts[tracked.layer_type].append(relative.sign_().sum().to(self._device))
        if not maxima:
            return {}
        zero = torch.zeros((), dtype=torch.float32, device=self._device)
        result = {f"spikes/{kind}": torch.stack(found).sum() if found else zero for kind, found in counts.items()}
        result["spikes/total"] = torch.stack(list(result.values())).sum()
        result["gss_max"] = torch.stack(maxima).amax()
        return result

    def _scratch(self, tracked: _Tracked) -> torch.Tensor:
        """A float32 work buffer shaped like `tracked.param`: a view of one flat buffer per device, kept across
        observations, since allocating fresh full-size temporaries costs more than the arithmetic on CPU."""
        device = tracked.abs_sum.device
        if device not in self._buffers:
            size = max(t.abs_sum.numel() for t in self._tracked.values() if t.abs_sum.device == device)
            self._buffers[device] = torch.empty(size, dtype=torch.float32, device=device)
        return self._buffers[device][:tracked.abs_sum.numel()].view(tracked.abs_sum.shape)

    def state_dict(self) -> dict:
        """The running sums (references, not copies, like `nn.Module.state_dict`) and observation counts."""
        return {"abs_sums": {name: tracked.abs_sum for name, tracked in self._tracked.items()},
                "observations": {name: tracked.observations for name, tracked in self._tracked.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output into a monitor built over the same parameters (and options)."""
        self.check_state_dict(state)
        for name, tracked in self._tracked.items():
            tracked.abs_sum.copy_(state["abs_sums"][name]).clamp_min_(_TINY)  # a state saved with 0-based sums
            tracked.observations = int(state["observations"][name])

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError (one line) unless `state` fits this monitor: lets a resume fail before it writes."""
        saved, expected = set(state["abs_sums"]), set(self._tracked)
        if saved != expected:
            raise ValueError(f"spike monitor state covers {len(saved)} tensors but this monitor tracks "
                             f"{len(expected)} (e.g. missing {sorted(expected - saved)[:3]}, unexpected "
                             f"{sorted(saved - expected)[:3]}); build it over the same parameters and "
                             "matrices_only setting as the saved run")
        for name, tracked in self._tracked.items():
            abs_sum = state["abs_sums"][name]
            if abs_sum.shape != tracked.abs_sum.shape:
                raise ValueError(f"spike monitor state for {name} has shape {tuple(abs_sum.shape)}, the "
                                 f"parameter {tuple(tracked.abs_sum.shape)}; resume with the same model config")

