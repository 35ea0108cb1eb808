"""One name -> optimizer class table, used by the training run and by anyone picking an optimizer by name."""

import torch

from galore_torch.adafactor import Adafactor
from galore_torch.blockwise8bit import AdamW8bit
from galore_torch.lion import Lion
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
}


def get_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Look up an optimizer by case-insensitive name; unknown names list the valid ones."""
    try:
        return OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; valid names: {', '.join(sorted(OPTIMIZERS))}"
        ) from None
