"""What an update costs: model FLOPs per token, achieved TFLOP/s and MFU, and peak memory.

Runs are compared by cost as well as by loss, so every update line carries these figures. None of them needs
the device: FLOPs come from the config and the batch shape, peak memory from the allocator's (CUDA) or the
kernel's (CPU) host-side counters, so logging them adds no host sync.
"""

import resource
import sys

import torch
from transformers import LlamaConfig

# Update-line keys measured with a clock or the allocator: they differ between two runs of the same training.
MEASURED_KEYS = ("throughput_tokens", "throughput_examples", "throughput_batches", "tokens_per_s", "tflops", "mfu",
                 "peak_memory_gb")

# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs our users train on, from the vendors' data sheets; the
# first name found in `torch.cuda.get_device_name()` wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def non_embedding_parameters(config: LlamaConfig) -> int:
    """Parameters of the decoder layers and the final norm: what every token multiplies through. The output
    projection (lm_head) is counted too, as it is a matmul per token; the input embedding is a lookup."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * inter  # gate, up, down
    norms = 2 * hidden
    return layers * (attention + mlp + norms) + hidden + hidden * config.vocab_size


def model_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's MFU:

        6 * N + 12 * L * d * T

    N: non-embedding parameters (lm_head included, see `non_embedding_parameters`), L: layers, d: hidden size,
    T: sequence length. 6N is 2 FLOPs per multiply-add times 3 (forward, and backward for inputs and weights);
    12 L d T is the attention scores and their weighted sum (QK^T and AV, 2 x 2 d T per layer forward, times 3).
    Activation recomputation is not counted (this is model FLOPs, not hardware FLOPs), nor are the simulated
    quantizers' elementwise ops.
    """
    return 6.0 * non_embedding_parameters(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak TFLOP/s per device for MFU: `override` (--peak_tflops) if given, else the bf16 peak of a known
    CUDA GPU; None (no MFU) on CPU and on GPUs not in the table."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for known, peak in PEAK_BF16_TFLOPS if known in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far, in GB: the caching allocator's peak of allocated tensors on CUDA,
    the peak resident set size (max RSS) on CPU. Both are host-side counters: no device sync."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


def throughput_values(*, positions: int, seconds: float, world_size: int, flops_per_token: float,
                      peak: float | None) -> dict[str, float]:
    """One update's figures. `positions`: token positions this rank pushed through the model (pads included,
    since the model computes them), the same on every rank. TFLOP/s and MFU are per device."""
    tokens_per_s = positions * world_size / seconds
    tflops = flops_per_token * positions / seconds / 1e12
    values = {"tokens_per_s": tokens_per_s, "tflops": tflops}
    if peak is not None:
        values["mfu"] = tflops / peak
    return values
