"""One checkpoint layout, one save and one load.

`save_dir/model_<update_step>/` holds the HF config + safetensors weights (loadable with
`LlamaForCausalLM.from_pretrained(dir)`; quantized models save the same keys), `optimizer.pt` (optimizer and
scheduler state plus the run config) and `training_state.json` (the counters). Loading never runs code:
safetensors for weights, `torch.load(weights_only=True)` for the optimizer.
"""

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

CHECKPOINT_PREFIX = "model_"
OPTIMIZER_FILE = "optimizer.pt"
TRAINING_STATE_FILE = "training_state.json"
_WEIGHTS_FILE = "model.safetensors"
_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


@dataclass
class TrainingState:
    """The counters of a run (the reference's training_state.json keys)."""

    global_step: int = 0  # micro-batches processed by this rank
    update_step: int = 0  # optimizer updates
    tokens_seen: int = 0  # non-pad training tokens, all ranks
    tokens_seen_before: int = 0  # tokens_seen at the previous update
    update_time: float = 0.0  # seconds of the last update


def checkpoint_path(save_dir: str | Path, update_step: int) -> Path:
    return Path(save_dir) / f"{CHECKPOINT_PREFIX}{update_step}"


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainingState,
                    run_config: dict) -> Path:
    """Write one checkpoint (call on rank 0 with the unwrapped model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "update_step": state.update_step, "global_step": state.global_step, "config": run_config},
               directory / OPTIMIZER_FILE)
    (directory / TRAINING_STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    return directory


def find_checkpoint(root: str | Path, step: int | None = None) -> Path:
    """The checkpoint to resume: `root/model_<step>`, else the newest `root/model_*`, or `root` itself if it
    is a checkpoint directory."""
    root = Path(root)
    if step is None and (root / TRAINING_STATE_FILE).is_file():
        return root
    steps = sorted(int(match.group(1)) for child in (root.iterdir() if root.is_dir() else [])
                   if (match := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", child.name))
                   and (child / TRAINING_STATE_FILE).is_file())
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"--resume_step {step}: no {root / f'{CHECKPOINT_PREFIX}{step}'} checkpoint; "
                                    f"available steps: {steps or 'none'}")
        return checkpoint_path(root, step)
    if not steps:
        raise FileNotFoundError(f"--continue_from {root}: no model_<step>/ checkpoint inside; "
                                "pass the run's --save_dir")
    return checkpoint_path(root, steps[-1])


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load safetensors weights (single file or sharded) into `model` in place, keys checked strictly."""
    index = directory / _WEIGHTS_INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [_WEIGHTS_FILE]
    device = next(model.parameters()).device
    weights = {}
    for name in files:
        weights.update(load_file(directory / name, device=str(device)))
    model.load_state_dict(weights, strict=True)


def load_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> TrainingState:
    """Load weights and counters; optimizer and scheduler state too when they are given."""
    directory = Path(directory)
    load_model_weights(model, directory)
    if optimizer is not None or scheduler is not None:
        saved = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    return TrainingState(**json.loads((directory / TRAINING_STATE_FILE).read_text()))
