"""One training run composed from the pieces: flags -> process group -> tokenizer, data, model, optimizer,
schedule -> (resume) -> DDP -> train -> final evaluation. `main` is the command line's error boundary."""

import argparse
import contextlib
import gc
import itertools
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers.utils import logging as hf_logging

from galore_torch import get_optimizer_class
from peft_pretraining.args import parse_args, resolve_batch_arithmetic
from peft_pretraining.checkpoint import (
    TrainingState,
    checkpoint_path,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from peft_pretraining.data import build_eval_dataloader, build_train_dataloader, load_tokenizer, resolve_dataset
from peft_pretraining.distributed import DistributedContext, init_distributed, print0, shutdown_distributed
from peft_pretraining.evaluation import evaluate
from peft_pretraining.metrics import RunLogger, WandbSettings, wandb_wanted, write_run_record
from peft_pretraining.model import (
    apply_tokenizer,
    build_model,
    count_parameters,
    load_llama_config,
    quant_configs_from_args,
)
from peft_pretraining.optim import build_optimizer
from peft_pretraining.schedules import build_scheduler
from peft_pretraining.trainer import NonFiniteLossError, Trainer, TrainSettings

# The reference shuffles C4 with a fixed seed whatever --seed is (spec g.1 item 5): runs with different
# --seed values differ in initialisation, not in data order.
DATA_SHUFFLE_SEED = 42


class UsageError(ValueError):
    """A flag, file or combination the run cannot start with (the message names it and the fix)."""


@dataclass
class RunResult:
    """What a finished run leaves behind (rank 0's view of the metrics)."""

    final_metrics: dict
    state: TrainingState
    save_dir: Path
    model: nn.Module


@dataclass
class _PreparedRun:
    args: argparse.Namespace
    ctx: DistributedContext
    model: nn.Module
    trainer: Trainer
    logger: RunLogger
    evaluate_now: Callable[[], dict]


def run(argv: list[str] | None = None) -> RunResult:
    """Train as `main_pretrain.py argv` would; raises UsageError for bad flags, files or combinations."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with _as_usage_error():
        args = parse_args(argv)
        # torchrun's WORLD_SIZE, read before the process group starts so batch-size errors surface first.
        resolve_batch_arithmetic(args, int(os.environ.get("WORLD_SIZE", "1")))
        ctx = init_distributed(single_gpu=args.single_gpu)
    try:
        with _as_usage_error():
            prepared = _prepare(args, ctx, argv)
    except BaseException:
        shutdown_distributed(ctx)
        raise
    # If training fails, the process group is left to interpreter exit: the DDP wrapper, still referenced by
    # the traceback, must die before its process group (gloo's destructor hangs the other way round).
    result = _execute(prepared)
    del prepared
    if ctx.is_distributed:
        gc.collect()  # DDP's reducer sits in reference cycles: free it now, before the process group
    shutdown_distributed(ctx)
    return result


def main(argv: list[str] | None = None) -> int:
    """Exit status of the command line: 0 done, 2 unusable flags (one line, no traceback), 1 diverged."""
    try:
        run(argv)
    except UsageError as err:
        print(f"main_pretrain.py: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"main_pretrain.py: training stopped: {err}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _as_usage_error():
    """Setup code raises ValueError/FileNotFoundError for user mistakes; mark them as such for `main`."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err


def _prepare(args, ctx: DistributedContext, argv: list[str]) -> _PreparedRun:
    """Everything before the first update; cheap checks first so user mistakes fail fast."""
    hf_logging.disable_progress_bar()
    get_optimizer_class(args.optimizer)  # fail on an unknown name before loading anything
    config = load_llama_config(args.model_config, max_length=args.max_length)
    weight_quant, act_quant = quant_configs_from_args(args)
    source = resolve_dataset(args.dataset)
    tokenizer = load_tokenizer(args.tokenizer, args.max_length)
    apply_tokenizer(config, tokenizer)

    model, quantized = _build_seeded_model(args, ctx, config, weight_quant, act_quant)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args.scheduler, num_training_steps=args.num_training_steps,
                                warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                                cycle_length=args.cycle_length, restart_warmup_steps=args.restart_warmup_steps)
    state = _resume(args, ctx, model, optimizer, scheduler)

    run_config = {**vars(args), "max_lr": args.lr, "total_params_M": round(count_parameters(model)[0] / 1e6, 2),
                  "world_size": ctx.world_size, "device": str(ctx.device), "quantized_layers": len(quantized),
                  "model": json.loads(config.to_json_string())}
    save_dir = Path(args.save_dir)
    logger = _start_logging(args, ctx, run_config, argv)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16_mixed" else None

    def evaluate_now() -> dict:
        batches = build_eval_dataloader(source, tokenizer, max_length=args.max_length,
                                        batch_size=args.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                        num_workers=args.workers, seed=DATA_SHUFFLE_SEED)
        result = evaluate(model, batches, max_tokens=args.eval_tokens, ctx=ctx, autocast_dtype=autocast_dtype)
        return result.as_metrics("eval")

    def save(training_state: TrainingState) -> None:
        if ctx.is_main:
            save_checkpoint(checkpoint_path(save_dir, training_state.update_step), model=model,
                            optimizer=optimizer, scheduler=scheduler, state=training_state, run_config=run_config)

    train_batches = build_train_dataloader(source, tokenizer, max_length=args.max_length,
                                           batch_size=args.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                           num_workers=args.workers, seed=DATA_SHUFFLE_SEED, packing=args.packing)
    if state.global_step > 0:
        # Skip exactly the micro-batches already consumed (the reference skipped one more and re-read them all).
        train_batches = itertools.islice(train_batches, state.global_step, None)

    wrapped = model
    if ctx.is_distributed:
        wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    settings = TrainSettings(num_training_steps=args.num_training_steps,
                             accumulation_steps=args.gradient_accumulation, total_batch_size=args.total_batch_size,
                             grad_clipping=args.grad_clipping, eval_every=args.eval_every,
                             save_every=args.save_every, autocast_dtype=autocast_dtype)
    trainer = Trainer(model=wrapped, optimizer=optimizer, scheduler=scheduler, batches=train_batches,
                      settings=settings, ctx=ctx, logger=logger, state=state, evaluate=evaluate_now, save=save)
    return _PreparedRun(args=args, ctx=ctx, model=model, trainer=trainer, logger=logger, evaluate_now=evaluate_now)


def _build_seeded_model(args, ctx: DistributedContext, config, weight_quant, act_quant) -> tuple[nn.Module, list]:
    """Seed every RNG like the reference (same seed on all ranks), build, and print the parameter count."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, quantized = build_model(config, dtype=args.dtype, device=ctx.device, weight_quant=weight_quant,
                                   act_quant=act_quant, activation_checkpointing=args.activation_checkpointing)
    total_params, trainable_params = count_parameters(model)
    print0(ctx, f"Total params: {total_params / 1e6:.2f}M")
    print0(ctx, f"Trainable params: {trainable_params / 1e6:.2f}M")
    if quantized:
        print0(ctx, f"Quantized layers: {len(quantized)} (weights: {weight_quant}, activations: {act_quant})")
    return model, quantized


def _resume(args, ctx: DistributedContext, model, optimizer, scheduler) -> TrainingState:
    """Counters (and weights) from --continue_from; optimizer and schedule only with --restore_optimizer."""
    if args.continue_from is None:
        return TrainingState()
    checkpoint = find_checkpoint(args.continue_from, args.resume_step)
    restore = args.restore_optimizer
    state = load_checkpoint(checkpoint, model=model, optimizer=optimizer if restore else None,
                            scheduler=scheduler if restore else None)
    print0(ctx, f"Resumed from {checkpoint} at update {state.update_step}"
                f"{' with optimizer state' if restore else ' (fresh optimizer and schedule)'}")
    return state


def _start_logging(args, ctx: DistributedContext, run_config: dict, argv: list[str]) -> RunLogger:
    """Write the run record and open metrics.jsonl (+ wandb when wanted) on rank 0."""
    wandb_settings = None
    if ctx.is_main:
        write_run_record(args.save_dir, run_config, argv)
        if wandb_wanted(args.unset_wandb):
            tags = [tag for tag in args.tags.split(",") if tag] if args.tags else None
            wandb_settings = WandbSettings(project=args.project, name=args.name, entity=args.entity, tags=tags)
    return RunLogger(args.save_dir, is_main=ctx.is_main, run_config=run_config, wandb_settings=wandb_settings,
                     resume=args.continue_from is not None)


def _execute(prepared: _PreparedRun) -> RunResult:
    ctx, logger = prepared.ctx, prepared.logger
    try:
        state = prepared.trainer.train()
        final = prepared.evaluate_now()
        final.update(final_eval_loss=final["eval_loss"], final_eval_tokens=final["eval_tokens"])
        logger.log(final, step=state.update_step)
    finally:
        logger.close()
    save_dir = Path(prepared.args.save_dir)
    print0(ctx, f"Final eval: loss {final['eval_loss']:.4f}, perplexity {final['eval_ppl']:.2f} over "
                f"{final['eval_tokens']:,} tokens (reference estimator: {final['eval_loss_reference']:.4f})")
    print0(ctx, f"Metrics: {save_dir / 'metrics.jsonl'}  checkpoints: {save_dir}/model_<step>/")
    return RunResult(final_metrics=final, state=state, save_dir=save_dir, model=prepared.model)
