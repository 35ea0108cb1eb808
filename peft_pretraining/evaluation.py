"""Held-out evaluation: the token-weighted loss, and the reference's biased estimator beside it.

The reference divided the sum of per-batch mean losses by (number of batches + 1), biasing the reported loss
low by n/(n+1) (~1%, docs/algorithms.md#g2-8). Papers quote it, so we log it as `eval_loss_reference` next to the
correct token-weighted `eval_loss`, which is what `eval_ppl` is computed from.
"""

import contextlib
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from peft_pretraining.distributed import DistributedContext, all_reduce_sum


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    loss_reference: float

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_ppl": self.perplexity, f"{prefix}_tokens": self.tokens,
                f"{prefix}_loss_reference": self.loss_reference}


class EvalAccumulator:
    """Running sums of one rank's evaluation, kept on the device so no batch forces a host sync."""

    def __init__(self, device: torch.device):
        # [sum of loss x targets, targets, non-pad tokens, sum of per-batch mean losses]
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.batches = 0

    def add(self, mean_loss: torch.Tensor, targets: int, tokens: int) -> None:
        """One batch: its mean loss over `targets` predicted tokens, and its `tokens` non-pad tokens."""
        mean_loss = mean_loss.detach().to(torch.float64)
        self.sums += torch.stack([mean_loss * targets, mean_loss.new_tensor(targets),
                                  mean_loss.new_tensor(tokens), mean_loss])
        self.batches += 1

    def result(self, ctx: DistributedContext) -> EvalResult:
        """Reduce over ranks: token-weighted loss over all targets; reference estimator averaged over ranks."""
        local_reference = self.sums[3] / (self.batches + 1)
        totals = all_reduce_sum(torch.cat([self.sums[:3], local_reference.reshape(1)]), ctx).tolist()
        weighted_loss, targets, tokens, reference_sum = totals
        loss = weighted_loss / targets if targets > 0 else math.nan
        return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)) if targets > 0 else math.nan,
                          tokens=int(tokens), loss_reference=reference_sum / ctx.world_size)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], *, max_tokens: int, ctx: DistributedContext,
             autocast_dtype: torch.dtype | None = None) -> EvalResult:
    """Evaluate on batches until `max_tokens` non-pad tokens have been seen over all ranks (counted as
    local x world size, like the reference, so ranks need not talk per batch) or the data ends."""
    was_training = model.training
    model.eval()
    accumulator = EvalAccumulator(ctx.device)
    autocast = (torch.autocast(ctx.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    # FSDP2 gathers every layer's weights from all ranks in each forward, so ranks must run equally many:
    # they agree on stopping before each batch (one small all-reduce per batch, under FSDP2 only).
    lockstep = ctx.is_distributed and isinstance(model, FSDPModule)
    seen = 0
    for batch in itertools.chain(batches, [None]):
        done = batch is None or seen * ctx.world_size >= max_tokens
        if lockstep:
            done = all_reduce_sum(torch.tensor([float(done)], device=ctx.device), ctx).item() > 0
        if done:
            break
        mask = batch["attention_mask"]
        tokens = int(mask.sum())
        targets = int(mask[:, 1:].sum())
        if targets == 0 and not lockstep:
            continue  # a batch of one-token documents has nothing to predict (its mean loss would be NaN)
        input_ids = batch["input_ids"].to(ctx.device, non_blocking=True)
        labels = input_ids.masked_fill(mask.to(ctx.device, non_blocking=True) == 0, -100)
        with autocast:
            loss = model(input_ids=input_ids, labels=labels).loss
        if targets > 0:
            accumulator.add(loss, targets, tokens)
            seen += tokens
    model.train(was_training)
    return accumulator.result(ctx)
