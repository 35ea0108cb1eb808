"""One checkpoint layout, one save and one load, crash-safe and unable to run code.

`save_dir/model_<update_step>/` holds:
- `config.json` + `model.safetensors`: the HF model (`LlamaForCausalLM.from_pretrained(dir)` loads it; quantized
  models save the same keys);
- `optimizer.pt`: the complete optimizer state (parameters named by FQN), the scheduler and the run config;
- `rank_<r>.pt`, one per rank: that rank's data position and RNG states (per-rank items never mix);
- `training_state.json`: the counters, written last: it marks the checkpoint complete.

Every rank calls `save_checkpoint` (model and optimizer state are gathered with
`torch.distributed.checkpoint.state_dict`, so a plain module, DDP and FSDP2 take the same path). Files go to
`save_dir/.tmp-model_<step>-<pid>/`, are fsync'd, and the directory is renamed into place; a crash leaves at most
a `.tmp-*` directory, which `find_checkpoint` never picks and the next save removes. Loading reads safetensors
and `torch.load(weights_only=True)` only. Every problem with a checkpoint is a one-line ValueError or
FileNotFoundError naming the file and the fix.
"""

import contextlib
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from peft_pretraining.checkpoint_layout import (  # re-exported: the layout is part of this module's interface
    CHECKPOINT_PREFIX,
    TRAINING_STATE_FILE,
    checkpoint_path,
    complete_checkpoints,
)

OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_TMP_PREFIX = ".tmp-"
# The fields that decide parameter shapes: a checkpoint of another model fails on these with a clear message.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads")
_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class TrainingState:
    """The counters of a run (the reference's training_state.json keys)."""

    global_step: int = 0  # micro-batches processed by this rank
    update_step: int = 0  # optimizer updates
    tokens_seen: int = 0  # non-pad training tokens, all ranks
    tokens_seen_before: int = 0  # tokens_seen at the previous update
    update_time: float = 0.0  # seconds of the last update


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


# ---------------------------------------------------------------------------------------------------- save


def save_checkpoint(save_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainingState, run_config: dict,
                    rank_state: dict | None = None, keep_last: int = 0) -> Path:
    """Write `save_dir/model_<state.update_step>/` atomically; call on every rank with the unwrapped model.

    `rank_state` (this rank's data position and RNG) goes to `rank_<r>.pt`. With `keep_last` > 0 only that many
    newest complete checkpoints remain afterwards.
    """
    rank, world_size = _rank_and_world_size()
    # Collectives first, on every rank: with FSDP2 these gather the shards.
    model_state = get_model_state_dict(model, options=_FULL_ON_CPU)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_CPU)
    save_dir = Path(save_dir)
    final = checkpoint_path(save_dir, state.update_step)
    tmp = _shared_tmp_dir(save_dir, final.name, rank, world_size)
    _save_synced({"world_size": world_size, "rank": rank, **(rank_state or {})}, tmp / rank_file(rank))
    _barrier(world_size)
    if rank == 0:
        model.save_pretrained(tmp, state_dict=model_state)
        _save_synced({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                      "update_step": state.update_step, "global_step": state.global_step, "config": run_config},
                     tmp / OPTIMIZER_FILE)
        for path in tmp.iterdir():
            _fsync_file(path)
        marker = tmp / TRAINING_STATE_FILE
        marker.write_text(json.dumps(asdict(state), indent=2) + "\n")
        _fsync_file(marker)
        _fsync_file(tmp)
        _move_into_place(tmp, final)
        if keep_last > 0:
            for old in list(complete_checkpoints(save_dir).values())[:-keep_last]:
                # Renamed first: a kill during the removal must not leave a partial checkpoint that looks complete.
                doomed = old.with_name(f"{_TMP_PREFIX}pruned-{old.name}-{os.getpid()}")
                old.rename(doomed)
                shutil.rmtree(doomed)
    _barrier(world_size)
    return final


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _shared_tmp_dir(save_dir: Path, name: str, rank: int, world_size: int) -> Path:
    """Rank 0 removes stale temporary directories (left by a crash) and makes a fresh one all ranks write to."""
    tmp = None
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = save_dir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
        tmp.mkdir()
    if world_size > 1:
        shared = [str(tmp) if tmp is not None else None]
        dist.broadcast_object_list(shared, src=0)
        tmp = Path(shared[0])
    return tmp


def _save_synced(obj, path: Path) -> None:
    with path.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list must reach the disk before the rename counts)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory to its name; an older checkpoint of the same step is replaced."""
    if final.exists():
        replaced = final.with_name(f"{_TMP_PREFIX}replaced-{final.name}-{os.getpid()}")
        final.rename(replaced)
        tmp.rename(final)
        shutil.rmtree(replaced)
    else:
        tmp.rename(final)
    _fsync_file(final.parent)


# ---------------------------------------------------------------------------------------------------- load


def find_checkpoint(root: str | Path, step: int | None = None) -> Path:
    """The checkpoint to resume: `root/model_<step>`, else the newest complete `root/model_*`, or `root` itself
    if it is a complete checkpoint directory."""
    root = Path(root)
    if step is None and (root / TRAINING_STATE_FILE).is_file():
        return root
    found = complete_checkpoints(root)
    if step is not None:
        if step not in found:
            raise FileNotFoundError(f"--resume_step {step}: no complete {root / f'{CHECKPOINT_PREFIX}{step}'} "
                                    f"checkpoint; available steps: {list(found) or 'none'}")
        return found[step]
    if not found:
        raise FileNotFoundError(f"--continue_from {root}: no complete model_<step>/ checkpoint inside; "
                                "pass the run's --save_dir")
    return found[max(found)]


def load_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> TrainingState:
    """Load weights and counters; optimizer and scheduler state too when they are given.

    The optimizer goes first: on an optimizer without state, torch's loader runs one step with zero gradients
    and lr 0 to create it. That advances step counters (restored from the saved param groups right after) and
    may draw random numbers (the RNG is restored last, by the caller); loading the weights afterwards undoes any
    move an optimizer makes with lr 0 (weight decay, a 0 x inf update).
    """
    directory = Path(directory)
    state = _read_training_state(directory)
    _check_model_config(directory, model)
    if optimizer is not None or scheduler is not None:
        saved = safe_torch_load(directory / OPTIMIZER_FILE)
        if optimizer is not None:
            with _as_incompatible(directory / OPTIMIZER_FILE):
                set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=_load_options(model))
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    load_model_weights(model, directory)
    return state


def _load_options(model: nn.Module) -> StateDictOptions:
    """Full-state loading (which cuts full tensors into shards) only for sharded (DTensor) parameters.

    Unsharded parameters take the plain path: torch 2.13's full-state path fails with a KeyError when the fresh
    optimizer already holds part of its state (SPAM creates its masks at construction)."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)


def load_rank_state(directory: str | Path, rank: int, world_size: int) -> dict:
    """This rank's saved data position and RNG states; the checkpoint must come from as many ranks."""
    path = Path(directory) / rank_file(rank)
    saved = safe_torch_load(path)
    if not isinstance(saved, dict) or not {"world_size", "data", "rng"} <= set(saved):
        raise ValueError(f"{path}: not a rank state (needs world_size, data and rng); resume from a checkpoint "
                         "this code wrote")
    if saved["world_size"] != world_size:
        raise ValueError(f"{path}: saved by a run of {saved['world_size']} processes, this run has {world_size}; "
                         "resume with the same --nproc_per_node x --nnodes")
    return saved


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load safetensors weights (single file or sharded) into `model` in place, keys and shapes checked."""
    index = directory / _WEIGHTS_INDEX_FILE
    if index.is_file():
        with _as_incompatible(index):
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [_WEIGHTS_FILE]
    weights = {}
    for name in files:
        path = directory / name
        _require_file(path)
        try:
            weights.update(load_file(path))
        except Exception as err:  # safetensors raises its own error type for truncated or garbled files
            raise ValueError(f"{path}: unreadable ({_first_line(err)}); the file is truncated or corrupt, "
                             "resume from another checkpoint with --resume_step") from err
    with _as_incompatible(directory / files[0]):
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))


def safe_torch_load(path: Path) -> dict:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never code."""
    _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused, it holds objects other than tensors and plain data "
                         "(a checkpoint must not run code on load); use a checkpoint this code wrote") from err
    except Exception as err:  # truncated zip, bad magic number, ...: the type varies with where the file ends
        raise ValueError(f"{path}: unreadable ({_first_line(err)}); the file is truncated or corrupt, "
                         "resume from another checkpoint with --resume_step") from err


def _read_training_state(directory: Path) -> TrainingState:
    path = directory / TRAINING_STATE_FILE
    _require_file(path)
    try:
        return TrainingState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a training state ({_first_line(err)}); resume from another "
                         "checkpoint with --resume_step") from err


def _check_model_config(directory: Path, model: nn.Module) -> None:
    path = directory / CONFIG_FILE
    _require_file(path)
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({_first_line(err)}); the checkpoint is corrupt") from err
    config = getattr(model, "config", None)
    differing = [f"{field} {saved.get(field)} vs {getattr(config, field, None)}" for field in _SHAPE_FIELDS
                 if field in saved and getattr(config, field, None) is not None
                 and saved[field] != getattr(config, field)]
    if differing:
        raise ValueError(f"{path}: the checkpoint is of another model ({', '.join(differing)}); resume with the "
                         "--model_config it was trained with")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the checkpoint is incomplete, resume from another one with "
                                "--resume_step")


@contextlib.contextmanager
def _as_incompatible(path: Path):
    """Turn a state that does not fit this model/optimizer (torch's RuntimeError/KeyError) into one line."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: does not fit this run ({_first_line(err)}); resume with the "
                         "--model_config, --optimizer and quantization flags it was saved with") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
