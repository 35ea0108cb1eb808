"""Optimizers for stable low-precision LLM pretraining (torch only)."""

from galore_torch.adafactor import Adafactor
from galore_torch.galore import GaLore
from galore_torch.galore_optimizers import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreSPAM,
    GaLoreStableSPAM,
    QGaLoreAdamW8bit,
)
from galore_torch.galore_projector import GaLoreProjector
from galore_torch.lion import Lion
from galore_torch.per_layer import GaLoreAdamW8bitPerLayer, PerLayerOptimizer, QGaLoreAdamW8bitPerLayer
from galore_torch.registry import OPTIMIZERS, get_optimizer_class
from galore_torch.spam import SPAM
from galore_torch.stable_spam import StableSPAM

__all__ = ["OPTIMIZERS", "Adafactor", "GaLore", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit",
           "GaLoreAdamW8bitPerLayer", "GaLoreProjector", "GaLoreSPAM", "GaLoreStableSPAM", "Lion",
           "PerLayerOptimizer", "QGaLoreAdamW8bit", "QGaLoreAdamW8bitPerLayer", "SPAM", "StableSPAM",
           "get_optimizer_class"]
