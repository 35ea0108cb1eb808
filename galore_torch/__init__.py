"""Optimizers for stable low-precision LLM pretraining (torch only)."""

from galore_torch.adafactor import Adafactor
from galore_torch.lion import Lion
from galore_torch.registry import OPTIMIZERS, get_optimizer_class
from galore_torch.spam import SPAM
from galore_torch.stable_spam import StableSPAM

__all__ = ["OPTIMIZERS", "Adafactor", "SPAM", "Lion", "StableSPAM", "get_optimizer_class"]
