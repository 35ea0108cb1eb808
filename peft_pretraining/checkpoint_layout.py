"""Where a run's checkpoints live and which are complete: standard library only, so that the launchers in
scripts/ (which must not need torch to plan a run) share the one rule with the training run."""

import re
from pathlib import Path

CHECKPOINT_PREFIX = "model_"
TRAINING_STATE_FILE = "training_state.json"  # written last: its presence marks a complete checkpoint


def checkpoint_path(save_dir: str | Path, update_step: int) -> Path:
    return Path(save_dir) / f"{CHECKPOINT_PREFIX}{update_step}"


def complete_checkpoints(root: str | Path) -> dict[int, Path]:
    """step -> directory of every complete `root/model_<step>/` (half-written ones lack the marker)."""
    root = Path(root)
    found = {}
    for child in (root.iterdir() if root.is_dir() else []):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", child.name)
        if match and (child / TRAINING_STATE_FILE).is_file():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))
