"""The update loop: accumulate micro-batches, measure and clip the gradient, step, schedule, log, and call
the evaluation and checkpoint hooks on their cadence.

Exactly `num_training_steps` updates are *applied* (the reference ran one more, at lr x 1e-7; docs/algorithms.md#g2-9).

Non-finite updates. Every update is checked once, after its last backward: it is non-finite when the sum of
its micro-batch losses or the global gradient norm (non-finite if any gradient element is) is NaN/inf. The
norm is the same on every rank after the gradient all-reduce; the losses are per rank, so a one-element flag
is summed over ranks and every rank takes the same decision. A non-finite update is skipped: no optimizer
step, no scheduler step, gradients zeroed, nothing observed by the spike monitor, so neither the weights nor
any optimizer or monitor state sees it. Its micro-batches are consumed (`global_step` counts them, so resume
does not read them again) but it does not count as an update: `update_step`, the schedule and `tokens_seen`
move with applied updates only, so a run with skips reads `num_training_steps + skipped` updates' worth of
data. `skipped_updates` (the running total) is on every update's log line; a skipped attempt logs
`skipped_updates` and `skipped_in_a_row` under the step number it would have had. More than
`max_skipped_updates` skipped updates in a row stop the run: the last good state (the weights and optimizer
of the last applied update) is checkpointed through `save` unless that update was just saved, a record
`{"step", "diverged": true, "skipped_in_a_row"}` is logged, then NonFiniteLossError is raised.

Host syncs: one per update, before the optimizer step (the skip decision needs it); micro-batches never wait
for the device. Values that exist only after the step (the spike monitor's scores and the optimizer's own
statistics, `optimizer.metrics()` where it has that method) are converted in the next update's sync, so such an
update's log line is written one update late (or before the eval/save hooks, and at the end).

`grad_norm` is the global gradient norm before clipping and `grad_norm_afterclip` the one after our
`grad_clipping`, for every optimizer; an optimizer's own measurements carry its prefix (`spam/...`).
"""

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from peft_pretraining.checkpoint import TrainingState
from peft_pretraining.distributed import DistributedContext, all_reduce_sum, print0
from peft_pretraining.metrics import RunLogger
from peft_pretraining.spike_monitor import GradientSpikeMonitor
from peft_pretraining.throughput import peak_memory_gb, throughput_values


class NonFiniteLossError(RuntimeError):
    """Too many non-finite updates in a row: the run stops instead of burning compute."""


@dataclass(frozen=True)
class TrainSettings:
    num_training_steps: int  # applied updates
    accumulation_steps: int
    total_batch_size: int  # sequences per update over all ranks
    grad_clipping: float = 0.0  # clip the global grad norm to this (0: off)
    eval_every: int = 5_000
    save_every: int = 10_000
    autocast_dtype: torch.dtype | None = None  # bf16 autocast over fp32 weights (bf16_mixed)
    max_skipped_updates: int = 10  # non-finite updates tolerated in a row (0: stop at the first)
    flops_per_token: float = 0.0  # model training FLOPs per token (throughput.model_flops_per_token)
    peak_tflops: float | None = None  # one device's peak, for MFU (None: no MFU)
    compiled: bool = False  # the model/optimizer are compiled: the first update's time includes compilation


@dataclass
class _PendingLine:
    """An applied update's log line waiting for its device values (converted in the next host sync)."""

    step: int
    values: dict[str, float]
    device_values: dict[str, torch.Tensor]


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's statistics of its last step (0-dim device tensors) if it measures any: the one optional
    method `metrics()` of the optimizer protocol; torch's optimizers have none."""
    metrics = getattr(optimizer, "metrics", None)
    return metrics() if metrics is not None else {}


class Trainer:
    """Runs updates from `state` to `settings.num_training_steps` over any iterable of batches
    ({"input_ids", "attention_mask"} on the host). Evaluation and checkpointing are the caller's hooks, called
    every `eval_every` / `save_every` updates (and `save` once more at the end, or when non-finite updates stop
    the run); the final evaluation is the caller's too. `spike_monitor`, if given, observes the gradients of
    applied updates before clipping; its scores and `optimizer.metrics()` join the update's log line."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, batches: Iterable[dict],
                 settings: TrainSettings, ctx: DistributedContext, logger: RunLogger,
                 state: TrainingState | None = None, evaluate: Callable[[], dict] | None = None,
                 save: Callable[[TrainingState], None] | None = None,
                 spike_monitor: GradientSpikeMonitor | None = None):
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
        self.spike_monitor = spike_monitor
        self.skipped_updates = 0
        self.skipped_in_a_row = 0
        self._pending: _PendingLine | None = None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._first_update_reported = False
        self._autocast = (torch.autocast(ctx.device.type, dtype=settings.autocast_dtype)
                          if settings.autocast_dtype is not None else contextlib.nullcontext())

    def extra_state(self) -> dict:
        """What a checkpoint needs beyond model/optimizer/scheduler/counters to resume this loop exactly."""
        monitor = self.spike_monitor
        return {"skipped_updates": self.skipped_updates,
                "spike_monitor": monitor.state_dict() if monitor is not None else None}

    def load_extra_state(self, extra: dict) -> None:
        """Restore `extra_state()` output. The in-a-row count restarts at 0 (a resumed run gets a fresh
        allowance); a monitor starts fresh when the checkpoint has no monitor state."""
        self.skipped_updates = int(extra.get("skipped_updates", 0))
        monitor_state = extra.get("spike_monitor")
        if self.spike_monitor is not None and monitor_state is not None:
            self.spike_monitor.load_state_dict(monitor_state)

    def train(self) -> TrainingState:
        settings, state = self.settings, self.state
        batches = iter(self.batches)
        saved_at = state.update_step or None  # a resumed run's checkpoint is already on disk
        self.logger.start_progress(settings.num_training_steps, state.update_step)
        self.model.train()
        while state.update_step < settings.num_training_steps:
            started = time.perf_counter()
            loss, loss_sum, tokens, positions = self._accumulate(batches)
            grad_norm = self._grad_norm()
            loss_value, norm_value, non_finite = self._host_values(
                [loss, grad_norm, self._non_finite_flag(loss_sum, grad_norm)])
            if non_finite:
                self._skip_update(loss_value, norm_value)
                if self.skipped_in_a_row > settings.max_skipped_updates:
                    self._stop(saved_at)
                continue
            self.skipped_in_a_row = 0
            self._apply_update(grad_norm, loss_value, norm_value, tokens, positions, started)
            step = state.update_step
            evaluate_now = self.evaluate is not None and step % settings.eval_every == 0 \
                and step < settings.num_training_steps
            save_now = self.save is not None and step % settings.save_every == 0
            if evaluate_now or save_now:
                self._flush_log()
            if evaluate_now:
                self.logger.log(self.evaluate(), step=step)
            if save_now:
                self.save(state)
                saved_at = step
        self._flush_log()
        if self.save is not None and saved_at != state.update_step:
            self.save(state)
        self.logger.close_progress()
        return state

    def _accumulate(self, batches) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Forward/backward over one update's micro-batches; returns the last micro-batch loss (unscaled,
        like the reference logs it), the sum of all micro-batch losses (for the finiteness check), the
        non-pad tokens of this rank and the token positions it computed (pads included)."""
        token_counts = []
        positions = 0
        loss_sum = None
        accumulation = self.settings.accumulation_steps
        for micro_step in range(accumulation):
            batch = next(batches)
            mask = batch["attention_mask"]
            token_counts.append(mask.sum())  # the batch is still on the host: no device work
            positions += mask.numel()
            input_ids = batch["input_ids"].to(self.ctx.device, non_blocking=True)
            labels = input_ids.masked_fill(mask.to(self.ctx.device, non_blocking=True) == 0, -100)
            with self._gradient_sync(micro_step == accumulation - 1):
                with self._autocast:
                    loss = self.model(input_ids=input_ids, labels=labels).loss
                (loss / accumulation).backward()
            loss = loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            self.state.global_step += 1
        return loss, loss_sum, int(torch.stack(token_counts).sum()), positions

    def _gradient_sync(self, last_micro_step: bool):
        """DDP all-reduces (FSDP2 reduce-scatters) gradients only on an update's last micro-batch."""
        if isinstance(self.model, DistributedDataParallel) and not last_micro_step:
            return self.model.no_sync()
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients: non-finite if any element is. FSDP2 (DTensor gradients) gives a
        DTensor; its full value is what clipping and the skip decision need."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _non_finite_flag(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """> 0 when any rank's loss or the (all-reduced, hence shared) grad norm is NaN/inf. The loss is
        per rank, so the flag is summed over ranks: every rank then skips, or steps, together."""
        flag = torch.logical_not(torch.isfinite(loss_sum.float()) & torch.isfinite(grad_norm)).float()
        return all_reduce_sum(flag.reshape(1), self.ctx)[0]

    def _host_values(self, tensors: list[torch.Tensor]) -> list[float]:
        """The update's one host sync: converts `tensors` together with the pending line's device values,
        and writes that line."""
        pending, self._pending = self._pending, None
        waiting = list(pending.device_values.values()) if pending is not None else []
        everything = [t.detach().float().reshape(()).to(self.ctx.device) for t in tensors + waiting]
        values = torch.stack(everything).tolist() if everything else []
        if pending is not None:
            pending.values.update(zip(pending.device_values, values[len(tensors):], strict=True))
            self.logger.log(pending.values, step=pending.step)
        return values[:len(tensors)]

    def _flush_log(self) -> None:
        """Write the pending line now (a host sync), e.g. before an eval/save hook or the end."""
        self._host_values([])

    def _apply_update(self, grad_norm: torch.Tensor, loss: float, norm: float, tokens: int, positions: int,
                      started: float) -> None:
        """Observe (monitor), clip, step, schedule; then log, or leave the line pending on device values."""
        step = self.state.update_step + 1
        device_values = self.spike_monitor.observe(step) if self.spike_monitor is not None else {}
        clipped_norm = self._clip_gradients(grad_norm, norm)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler moves it next)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        device_values |= optimizer_metrics(self.optimizer)
        self._record_update(tokens, time.perf_counter() - started)
        self._report_first_update()
        values = self._update_values(loss, norm, clipped_norm, lr, positions)
        if device_values:
            self._pending = _PendingLine(step=self.state.update_step, values=values, device_values=device_values)
        else:
            self.logger.log(values, step=self.state.update_step)
        figures = {"mfu": f"{values['mfu']:.1%}"} if "mfu" in values else {"tflops": f"{values['tflops']:.3g}"}
        self.logger.advance_progress(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{values['tokens_per_s']:,.0f}",
                                     **figures, mem_gb=f"{values['peak_memory_gb']:.2f}")

    def _clip_gradients(self, grad_norm: torch.Tensor, norm: float) -> float:
        """Clip to the global norm `grad_norm` (host copy: `norm`); returns the norm after clipping."""
        if self.settings.grad_clipping > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.settings.grad_clipping, grad_norm)
            return min(norm, self.settings.grad_clipping)
        return norm

    def _skip_update(self, loss: float, grad_norm: float) -> None:
        """Drop a non-finite update's gradients; count and report it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.skipped_in_a_row += 1
        attempted = self.state.update_step + 1
        self.logger.log({"skipped_updates": self.skipped_updates, "skipped_in_a_row": self.skipped_in_a_row},
                        step=attempted)
        print0(self.ctx, f"update {attempted}: non-finite loss {loss} or gradient norm {grad_norm}; skipped "
                         f"({self.skipped_in_a_row} in a row, {self.skipped_updates} in all)")

    def _stop(self, saved_at: int | None) -> None:
        """Checkpoint the last good state (if it is not on disk yet), log a `diverged` record (so tools reading
        metrics.jsonl, e.g. scripts/sweep.py, see the stop) and raise NonFiniteLossError."""
        state, settings = self.state, self.settings
        self._flush_log()
        self.logger.close_progress()
        if self.save is None:
            kept = "no checkpoint hook"
        elif saved_at == state.update_step:
            kept = f"the last good state is checkpoint {state.update_step}"
        elif state.update_step == 0:
            kept = "no update was applied, so there is nothing to save"
        elif self._weights_finite():
            self.save(state)
            kept = f"the last good state is saved as checkpoint {state.update_step}"
        else:
            kept = "the weights themselves are non-finite, not saved; resume from an earlier checkpoint"
        self.logger.log({"diverged": True, "skipped_in_a_row": self.skipped_in_a_row}, step=state.update_step + 1)
        raise NonFiniteLossError(
            f"{self.skipped_in_a_row} non-finite updates in a row after update {state.update_step} "
            f"(--max_skipped_updates {settings.max_skipped_updates}); {kept}; lower --lr or set --grad_clipping")

    def _weights_finite(self) -> bool:
        """All weights finite on every rank (only when stopping: one pass over the weights and a sync)."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self._params]  # FSDP2: this rank's shard
        bad = torch.stack([torch.logical_not(torch.isfinite(p).all()) for p in local]).sum().float()
        return all_reduce_sum(bad.reshape(1), self.ctx).item() == 0

    def _record_update(self, tokens: int, seconds: float) -> None:
        state = self.state
        state.update_step += 1
        state.tokens_seen_before = state.tokens_seen
        state.tokens_seen += tokens * self.ctx.world_size
        state.update_time = seconds

    def _report_first_update(self) -> None:
        """With --compile the first update of a process pays for compilation: say how long it took."""
        if self.settings.compiled and not self._first_update_reported:
            self._first_update_reported = True
            print0(self.ctx, f"update {self.state.update_step} took {self.state.update_time:.1f} s "
                             "(the first of this process: includes torch.compile's compilation)")

    def _update_values(self, loss: float, grad_norm: float, clipped_norm: float, lr: float,
                       positions: int) -> dict[str, float]:
        """The update's log line (host values only). `lr` is the rate the update used; throughput figures
        are over all ranks (tokens/s) or per device (TFLOP/s, MFU); see peft_pretraining.throughput."""
        state, seconds, settings = self.state, self.state.update_time, self.settings
        return {
            "loss": loss,
            "lr": lr,
            "tokens_seen": state.tokens_seen,
            "throughput_tokens": (state.tokens_seen - state.tokens_seen_before) / seconds,
            "throughput_examples": self.settings.total_batch_size / seconds,
            "throughput_batches": self.settings.accumulation_steps * self.ctx.world_size / seconds,
            "grad_norm": grad_norm,
            "grad_norm_afterclip": clipped_norm,
            "skipped_updates": self.skipped_updates,
            **throughput_values(positions=positions, seconds=seconds, world_size=self.ctx.world_size,
                                flops_per_token=settings.flops_per_token, peak=settings.peak_tflops),
            "peak_memory_gb": peak_memory_gb(self.ctx.device),
        }
