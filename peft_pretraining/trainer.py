"""The update loop: accumulate micro-batches, measure and clip the gradient, step, schedule, log, and call
the evaluation and checkpoint hooks on their cadence.

Exactly `num_training_steps` updates run (the reference ran one more, at lr x 1e-7; spec g.2 #9). The only
host sync is once per update, to log loss and grad norm; micro-batches never wait for the device.
"""

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from peft_pretraining.checkpoint import TrainingState
from peft_pretraining.distributed import DistributedContext
from peft_pretraining.metrics import RunLogger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the weights are lost, so the run stops instead of burning compute."""


@dataclass(frozen=True)
class TrainSettings:
    num_training_steps: int
    accumulation_steps: int
    total_batch_size: int  # sequences per update over all ranks
    grad_clipping: float = 0.0  # clip the global grad norm to this (0: off)
    eval_every: int = 5_000
    save_every: int = 10_000
    autocast_dtype: torch.dtype | None = None  # bf16 autocast over fp32 weights (bf16_mixed)


class Trainer:
    """Runs updates from `state` to `settings.num_training_steps` over any iterable of batches
    ({"input_ids", "attention_mask"} on the host). Evaluation and checkpointing are the caller's hooks, called
    every `eval_every` / `save_every` updates (and `save` once more at the end); the final evaluation is the
    caller's too."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, batches: Iterable[dict],
                 settings: TrainSettings, ctx: DistributedContext, logger: RunLogger,
                 state: TrainingState | None = None, evaluate: Callable[[], dict] | None = None,
                 save: Callable[[TrainingState], None] | None = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batches = batches
        self.settings = settings
        self.ctx = ctx
        self.logger = logger
        self.state = state if state is not None else TrainingState()
        self.evaluate = evaluate
        self.save = save
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._autocast = (torch.autocast(ctx.device.type, dtype=settings.autocast_dtype)
                          if settings.autocast_dtype is not None else contextlib.nullcontext())

    def train(self) -> TrainingState:
        settings, state = self.settings, self.state
        batches = iter(self.batches)
        saved_at = None
        self.logger.start_progress(settings.num_training_steps, state.update_step)
        self.model.train()
        while state.update_step < settings.num_training_steps:
            started = time.perf_counter()
            loss, tokens = self._accumulate(batches)
            grad_norm, clipped_norm = self._clip_gradients()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            after_clip = getattr(self.optimizer, "last_grad_norm", None)
            after_clip = clipped_norm if after_clip is None else after_clip
            loss_value, norm_value, after_clip_value = torch.stack(
                [loss.float(), grad_norm.float(), after_clip.float().to(loss.device)]).tolist()
            self._record_update(tokens, time.perf_counter() - started)
            self._log_update(loss_value, norm_value, after_clip_value)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss became {loss_value} at update {state.update_step}; "
                                         "lower --lr, set --grad_clipping, or resume from an earlier checkpoint")
            step = state.update_step
            if self.evaluate is not None and step % settings.eval_every == 0 and step < settings.num_training_steps:
                self.logger.log(self.evaluate(), step=step)
            if self.save is not None and step % settings.save_every == 0:
                self.save(state)
                saved_at = step
        if self.save is not None and saved_at != state.update_step:
            self.save(state)
        self.logger.close_progress()
        return state

    def _accumulate(self, batches) -> tuple[torch.Tensor, int]:
        """Forward/backward over one update's micro-batches; returns the last micro-batch loss (unscaled,
        like the reference logs it) and the non-pad tokens of this rank."""
        tokens = 0
        accumulation = self.settings.accumulation_steps
        for micro_step in range(accumulation):
            batch = next(batches)
            mask = batch["attention_mask"]
            tokens += int(mask.sum())  # the batch is still on the host: no device sync
            input_ids = batch["input_ids"].to(self.ctx.device, non_blocking=True)
            labels = input_ids.masked_fill(mask.to(self.ctx.device, non_blocking=True) == 0, -100)
            with self._gradient_sync(micro_step == accumulation - 1):
                with self._autocast:
                    loss = self.model(input_ids=input_ids, labels=labels).loss
                (loss / accumulation).backward()
            self.state.global_step += 1
        return loss.detach(), tokens

    def _gradient_sync(self, last_micro_step: bool):
        """DDP all-reduces gradients only on an update's last micro-batch."""
        if isinstance(self.model, DistributedDataParallel) and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global L2 grad norm before clipping (logged as grad_norm) and after it."""
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.settings.grad_clipping > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.settings.grad_clipping, norm)
            return norm, norm.clamp(max=self.settings.grad_clipping)
        return norm, norm

    def _record_update(self, tokens: int, seconds: float) -> None:
        state = self.state
        state.update_step += 1
        state.tokens_seen_before = state.tokens_seen
        state.tokens_seen += tokens * self.ctx.world_size
        state.update_time = seconds

    def _log_update(self, loss: float, grad_norm: float, grad_norm_after_clip: float) -> None:
        state, seconds = self.state, self.state.update_time
        tokens_per_second = (state.tokens_seen - state.tokens_seen_before) / seconds
        lr = self.optimizer.param_groups[0]["lr"]
        self.logger.log({
            "loss": loss,
            "lr": lr,
            "tokens_seen": state.tokens_seen,
            "throughput_tokens": tokens_per_second,
            "throughput_examples": self.settings.total_batch_size / seconds,
            "throughput_batches": self.settings.accumulation_steps * self.ctx.world_size / seconds,
            "grad_norm": grad_norm,
            "grad_norm_afterclip": grad_norm_after_clip,
        }, step=state.update_step)
        self.logger.advance_progress(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
