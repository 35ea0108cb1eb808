"""Optimizers for stable low-precision LLM pretraining (torch only)."""

from galore_torch.registry import OPTIMIZERS, get_optimizer_class

__all__ = ["OPTIMIZERS", "get_optimizer_class"]
