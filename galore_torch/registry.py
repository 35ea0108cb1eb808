"""One name -> optimizer class table, used by the training run and by anyone picking an optimizer by name."""

import torch

from galore_torch.adafactor import Adafactor
from galore_torch.blockwise8bit import AdamW8bit
from galore_torch.galore_optimizers import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreSPAM,
    GaLoreStableSPAM,
    QGaLoreAdamW8bit,
)
from galore_torch.lion import Lion
from galore_torch.per_layer import GaLoreAdamW8bitPerLayer, QGaLoreAdamW8bitPerLayer
from galore_torch.spam import SPAM
from galore_torch.stable_spam import StableSPAM

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adamw8bit": AdamW8bit,  # moments stored blockwise 8-bit, as bitsandbytes' AdamW8bit
    "adafactor": Adafactor,  # transformers' semantics, as the reference's baselines ran
    "adafactor_torch": torch.optim.Adafactor,  # torch's variant: no first moment, no update clipping
    "sgd": torch.optim.SGD,
    "lion": Lion,
    "spam": SPAM,
    "stablespam": StableSPAM,
    # GaLore: optimizer state in a rank-r subspace of each attn/mlp matrix (the reference's names)
    "galore_adamw": GaLoreAdamW,
    "galore_adafactor": GaLoreAdafactor,
    "galore_adamw8bit": GaLoreAdamW8bit,
    "galore_adamw8bit_per_layer": GaLoreAdamW8bitPerLayer,
    "q_galore_adamw8bit": QGaLoreAdamW8bit,
    "q_galore_adamw8bit_per_layer": QGaLoreAdamW8bitPerLayer,
    "galore_stablespam": GaLoreStableSPAM,  # StableSPAM in the subspace (new)
    "galore_spam": GaLoreSPAM,  # SPAM in the subspace (new)
}


def get_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Look up an optimizer by case-insensitive name; unknown names list the valid ones."""
    try:
        return OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; valid names: {', '.join(sorted(OPTIMIZERS))}"
        ) from None
