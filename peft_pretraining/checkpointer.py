"""The run's checkpointer: it holds what a checkpoint saves and owns the order in which a resume restores it.

A checkpoint of a run is the model, the optimizer, the scheduler and the counters (`peft_pretraining.checkpoint`
writes them), plus per rank: the data position, every RNG and the loop's own counters (skip count, spike
monitor). Resuming restores them in the one order that is exact:

1. `load`: the optimizer before the weights (torch's loader may step an empty optimizer once, with lr 0; the
   weights loaded after undo any move), the scheduler, the counters; this rank's data position is read, as
   the training data stream is built from it;
2. `check_resumable`: what only step 3 restores must be known to fit before the run's first write;
3. `restore_loop`: the loop's counters into the trainer, then the RNGs, last (building the run draws random
   numbers, and so may torch's optimizer-state loader).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peft_pretraining.checkpoint import (
    TrainingState,
    find_checkpoint,
    load_checkpoint,
    load_rank_state,
    rank_file,
    save_checkpoint,
)
from peft_pretraining.data import ResumableBatches
from peft_pretraining.distributed import DistributedContext, print0
from peft_pretraining.rng import capture_rng_state, check_rng_state, restore_rng_state
from peft_pretraining.spike_monitor import GradientSpikeMonitor
from peft_pretraining.trainer import Trainer


@dataclass
class Resumed:
    """What a resume read beyond the weights: counters, this rank's data position, RNG states, loop state."""

    state: TrainingState
    data_state: dict | None = None
    rng_state: dict | None = None
    rank_file: str = ""
    trainer_state: dict = field(default_factory=dict)  # Trainer.extra_state(): skip count, spike monitor


class Checkpointer:
    """Saves the run into `save_dir/model_<step>/` and resumes it, in the order the module docstring gives.

    The data stream and the trainer exist only after the resume read their state, so they join through
    `track` before the first save."""

    def __init__(self, save_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, ctx: DistributedContext, run_config: dict,
                 keep_last: int = 0):
        self.save_dir = Path(save_dir)
        self.model = model  # unwrapped: FSDP2 shards it in place, DDP wraps it later
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ctx = ctx
        self.run_config = run_config
        self.keep_last = keep_last
        self.batches: ResumableBatches | None = None
        self.trainer: Trainer | None = None

    def track(self, *, batches: ResumableBatches, trainer: Trainer) -> None:
        """Include the data position and the loop's counters in every checkpoint from now on."""
        self.batches = batches
        self.trainer = trainer

    def save(self, state: TrainingState) -> Path:
        """Write the checkpoint of update `state.update_step`; every rank calls it (the state gathering is
        collective, and each rank writes its own data position and RNG)."""
        if self.batches is None or self.trainer is None:
            raise RuntimeError("Checkpointer.save before track(): the data position and loop state are missing")
        return save_checkpoint(self.save_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               state=state, run_config=self.run_config, keep_last=self.keep_last,
                               rank_state={"data": self.batches.state_dict(), "rng": capture_rng_state(self.model),
                                           "trainer": self.trainer.extra_state()})

    def load(self, continue_from: str | None, *, resume_step: int | None, restore_optimizer: bool) -> Resumed:
        """Weights, counters and (read, for the data stream) this rank's data position from `continue_from`;
        optimizer and schedule only with `restore_optimizer` (without it the run restarts warm-up with fresh
        optimizer state, so it is not exact). Nothing to load: a fresh run's state."""
        if continue_from is None:
            return Resumed(TrainingState())
        checkpoint = find_checkpoint(continue_from, resume_step)
        state = load_checkpoint(checkpoint, model=self.model,
                                optimizer=self.optimizer if restore_optimizer else None,
                                scheduler=self.scheduler if restore_optimizer else None)
        saved = load_rank_state(checkpoint, self.ctx.rank, self.ctx.world_size)
        print0(self.ctx, f"Resumed from {checkpoint} at update {state.update_step}"
                         f"{' with optimizer state' if restore_optimizer else ' (fresh optimizer and schedule)'}")
        return Resumed(state, data_state=saved["data"], rng_state=saved["rng"],
                       rank_file=str(checkpoint / rank_file(self.ctx.rank)), trainer_state=saved.get("trainer", {}))

    def check_resumable(self, resumed: Resumed, spike_monitor: GradientSpikeMonitor | None) -> None:
        """What `restore_loop` restores only after the run's first writes must be known to fit before them."""
        if resumed.rng_state is not None:
            check_rng_state(self.model, resumed.rng_state, source=resumed.rank_file)
        monitor_state = resumed.trainer_state.get("spike_monitor")
        if spike_monitor is not None and monitor_state is not None:
            try:
                spike_monitor.check_state_dict(monitor_state)
            except ValueError as err:
                raise ValueError(f"{resumed.rank_file}: {err}") from err

    def restore_loop(self, resumed: Resumed, trainer: Trainer) -> None:
        """The loop's counters, then the RNGs: last, after everything that may draw random numbers."""
        trainer.load_extra_state(resumed.trainer_state)
        if resumed.rng_state is not None:
            restore_rng_state(self.model, resumed.rng_state, source=resumed.rank_file)
