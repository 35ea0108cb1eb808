"""Q-GaLore's storage of a projection factor: asymmetric min-max integer codes per group of entries.

Written here rather than imported from `quantization/` so that galore_torch stays self-contained (torch only).
"""

import torch


def quantize_factor(factor: torch.Tensor, bits: int,
                    group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, minima) of `factor`: codes in [0, 2^bits - 1] as uint8 (one code per byte, also for
    INT4), float32 scale and minimum per group of `group_size` consecutive entries (the last group padded)."""
    flat = factor.detach().float().reshape(-1)
    pad = -flat.numel() % group_size
    groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, group_size)
    minima = groups.amin(dim=1, keepdim=True)
    # a constant group has range 0: any positive scale codes it exactly as its minimum
    scales = ((groups.amax(dim=1, keepdim=True) - minima) / (2**bits - 1)).clamp_(min=torch.finfo(torch.float32).tiny)
    codes = ((groups - minima) / scales).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scales, minima


def dequantize_factor(codes: torch.Tensor, scales: torch.Tensor, minima: torch.Tensor, shape: torch.Size,
                      dtype: torch.dtype) -> torch.Tensor:
    """The factor that `quantize_factor` coded, in `dtype`."""
    numel = shape[0] * shape[1]
    return (codes.float() * scales + minima).reshape(-1)[:numel].view(shape).to(dtype)
