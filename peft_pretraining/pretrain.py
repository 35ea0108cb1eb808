"""One training run composed from the pieces, in explicit build steps (`_prepare`): flags -> process group ->
inputs (model config, quantization, data source, tokenizer) -> model -> optimizer and schedule -> checkpointer
(resume) -> training data stream -> trainer (DDP) -> train -> final evaluation. `main` is the command line's
error boundary."""

import argparse
import contextlib
import gc
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
from tqdm import tqdm
from transformers import LlamaConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from peft_pretraining.args import flag_warnings, one_line, parse_args, resolve_batch_arithmetic
from peft_pretraining.checkpoint import TrainingState
from peft_pretraining.checkpointer import Checkpointer, Resumed
from peft_pretraining.data import (
    DatasetSource,
    ResumableBatches,
    build_eval_dataloader,
    build_resumable_train_batches,
    load_tokenizer,
    resolve_dataset,
)
from peft_pretraining.distributed import (
    DistributedContext,
    accelerate_launch_notes,
    all_reduce_sum,
    init_distributed,
    print0,
    shutdown_distributed,
)
from peft_pretraining.evaluation import evaluate
from peft_pretraining.fsdp import shard_model
from peft_pretraining.metrics import RunLogger, WandbSettings, truncate_metrics, wandb_wanted, write_run_record
from peft_pretraining.model import (
    apply_tokenizer,
    build_model,
    compile_layers,
    count_parameters,
    load_llama_config,
    quant_configs_from_args,
)
from peft_pretraining.optim import build_optimizer
from peft_pretraining.preflight import check_run_inputs
from peft_pretraining.schedules import build_scheduler
from peft_pretraining.spike_monitor import GradientSpikeMonitor
from peft_pretraining.throughput import model_flops_per_token, peak_tflops
from peft_pretraining.trainer import NonFiniteLossError, Trainer, TrainSettings
from quantization import QuantConfig

# The reference shuffles C4 with a fixed seed whatever --seed is (docs/algorithms.md#g1-5): runs with different
# --seed values differ in initialisation, not in data order.
DATA_SHUFFLE_SEED = 42
# An evaluation over fewer tokens is noise, and the reference estimator (sum of per-batch mean losses over
# batches + 1) is then far below the loss: say so.
SMALL_EVAL_TOKENS = 10_000


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
        print(f"main_pretrain.py: error: {one_line(str(err))}", file=sys.stderr)
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
    """Everything before the first update, one build step after the other, each taking what the steps before
    returned; cheap checks first so user mistakes fail fast, and every check before the run's first write."""
    inputs = _build_inputs(args, ctx, argv)
    model, quantized = _build_model(args, ctx, inputs)
    optimizer, scheduler = _build_optimizer_and_scheduler(args, model)
    run_config = {**vars(args), "max_lr": args.lr, "total_params_M": round(count_parameters(model)[0] / 1e6, 2),
                  "world_size": ctx.world_size, "device": str(ctx.device), "quantized_layers": len(quantized),
                  "model": json.loads(inputs.config.to_json_string())}
    checkpointer = Checkpointer(args.save_dir, model=model, optimizer=optimizer, scheduler=scheduler, ctx=ctx,
                                run_config=run_config, keep_last=args.keep_last)
    resumed = checkpointer.load(args.continue_from, resume_step=args.resume_step,
                                restore_optimizer=args.restore_optimizer)
    train_batches = _build_train_batches(args, ctx, inputs, resumed)
    # The monitor's sums are the same on every rank (gradients are all-reduced) and only rank 0 logs.
    spike_monitor = (GradientSpikeMonitor(model.named_parameters(), threshold=args.spike_threshold,
                                          every=args.spike_every) if args.spike_monitor and ctx.is_main else None)
    checkpointer.check_resumable(resumed, spike_monitor)
    logger = _start_logging(args, ctx, run_config, argv,
                            resumed_step=resumed.state.update_step if args.continue_from is not None else None)
    evaluate_now = _build_evaluation(args, ctx, inputs, model)
    trainer = _build_trainer(args, ctx, inputs, model, optimizer, scheduler, train_batches, logger, resumed.state,
                             evaluate_now, checkpointer.save, spike_monitor)
    checkpointer.track(batches=train_batches, trainer=trainer)
    checkpointer.restore_loop(resumed, trainer)
    return _PreparedRun(args=args, ctx=ctx, model=model, trainer=trainer, logger=logger, evaluate_now=evaluate_now)


@dataclass
class _Inputs:
    """What the flags resolve to before the model exists: its config, the quantization, the data and tokenizer."""

    config: LlamaConfig
    weight_quant: QuantConfig | None
    act_quant: QuantConfig | None
    source: DatasetSource
    tokenizer: PreTrainedTokenizerBase


def _build_inputs(args, ctx: DistributedContext, argv: list[str]) -> _Inputs:
    """Read and check every input the run names (nothing is written yet), and load the tokenizer."""
    hf_logging.disable_progress_bar()
    for note in accelerate_launch_notes(dict(os.environ)):
        print0(ctx, f"note: {note}")
    config = load_llama_config(args.model_config, max_length=args.max_length)
    weight_quant, act_quant = quant_configs_from_args(args)
    for warning in flag_warnings(args, argv):
        print0(ctx, f"warning: {warning}")
    source = resolve_dataset(args.dataset)
    check_run_inputs(args, source)  # before anything is written
    tokenizer = load_tokenizer(args.tokenizer, args.max_length)
    apply_tokenizer(config, tokenizer)
    return _Inputs(config=config, weight_quant=weight_quant, act_quant=act_quant, source=source,
                   tokenizer=tokenizer)


def _build_model(args, ctx: DistributedContext, inputs: _Inputs) -> tuple[nn.Module, list]:
    """Seed every RNG like the reference (same seed on all ranks), build, print the parameter count, then shard
    (FSDP2, in place, before the optimizer takes the parameters) and compile by layer."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, quantized = build_model(inputs.config, dtype=args.dtype, device=ctx.device,
                                   weight_quant=inputs.weight_quant, act_quant=inputs.act_quant,
                                   activation_checkpointing=args.activation_checkpointing)
    total_params, trainable_params = count_parameters(model)
    print0(ctx, f"Total params: {total_params / 1e6:.2f}M")
    print0(ctx, f"Trainable params: {trainable_params / 1e6:.2f}M")
    if quantized:
        print0(ctx, f"Quantized layers: {len(quantized)} (weights: {inputs.weight_quant}, activations: "
                    f"{inputs.act_quant})")
    if args.fsdp:
        shard_model(model, ctx, args.fsdp_param_dtype)
    if args.compile:
        print0(ctx, f"Compiling {compile_layers(model)} decoder layers (each on its own) and the optimizer step")
    return model, quantized


def _build_optimizer_and_scheduler(args, model: nn.Module) -> tuple[torch.optim.Optimizer,
                                                                    torch.optim.lr_scheduler.LRScheduler]:
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args.scheduler, num_training_steps=args.num_training_steps,
                                warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                                cycle_length=args.cycle_length, restart_warmup_steps=args.restart_warmup_steps)
    return optimizer, scheduler


def _build_train_batches(args, ctx: DistributedContext, inputs: _Inputs, resumed: Resumed) -> ResumableBatches:
    """A resumed run continues each worker's stream where the checkpoint left it: nothing is trained on twice
    (the reference re-read and skipped every consumed batch, plus one more)."""
    return build_resumable_train_batches(inputs.source, inputs.tokenizer, max_length=args.max_length,
                                         batch_size=args.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                         num_workers=args.workers, seed=DATA_SHUFFLE_SEED, packing=args.packing,
                                         state=resumed.data_state, state_file=resumed.rank_file,
                                         notify=tqdm.write if ctx.is_main else None)  # above the bar


def _build_evaluation(args, ctx: DistributedContext, inputs: _Inputs, model: nn.Module) -> Callable[[], dict]:
    """The evaluation hook: a fresh pass over the validation data each call; warns once if it is small."""
    autocast_dtype = _autocast_dtype(args)
    small_eval_said = False

    def evaluate_now() -> dict:
        nonlocal small_eval_said
        batches = build_eval_dataloader(inputs.source, inputs.tokenizer, max_length=args.max_length,
                                        batch_size=args.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                        num_workers=args.workers, seed=DATA_SHUFFLE_SEED)
        result = evaluate(model, batches, max_tokens=args.eval_tokens, ctx=ctx, autocast_dtype=autocast_dtype)
        if result.tokens < min(SMALL_EVAL_TOKENS, args.eval_tokens) and not small_eval_said:
            small_eval_said = True
            print0(ctx, f"warning: the evaluation set of --dataset {args.dataset} has only {result.tokens:,} tokens "
                        f"(under {SMALL_EVAL_TOKENS:,}): eval_loss is noisy, and the reference estimator "
                        "(eval_loss_reference: the sum of per-batch mean losses over batches + 1, the papers' "
                        "number) reads far below it; add a *validation* file with more text")
        return result.as_metrics("eval")

    return evaluate_now


def _autocast_dtype(args) -> torch.dtype | None:
    return torch.bfloat16 if args.dtype == "bf16_mixed" else None


def _build_trainer(args, ctx: DistributedContext, inputs: _Inputs, model: nn.Module,
                   optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   batches: ResumableBatches, logger: RunLogger, state: TrainingState,
                   evaluate_now: Callable[[], dict], save: Callable[[TrainingState], object],
                   spike_monitor: GradientSpikeMonitor | None) -> Trainer:
    """Wrap the model for data parallelism (DDP; FSDP2 wrapped it in place) and set the loop's cadence."""
    wrapped = model
    if ctx.is_distributed and not args.fsdp:
        wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    settings = TrainSettings(num_training_steps=args.num_training_steps,
                             accumulation_steps=args.gradient_accumulation, total_batch_size=args.total_batch_size,
                             grad_clipping=args.grad_clipping, eval_every=args.eval_every,
                             save_every=args.save_every, autocast_dtype=_autocast_dtype(args),
                             max_skipped_updates=args.max_skipped_updates,
                             flops_per_token=model_flops_per_token(inputs.config, args.max_length),
                             peak_tflops=peak_tflops(ctx.device, args.peak_tflops), compiled=args.compile)
    return Trainer(model=wrapped, optimizer=optimizer, scheduler=scheduler, batches=batches, settings=settings,
                   ctx=ctx, logger=logger, state=state, evaluate=evaluate_now, save=save,
                   spike_monitor=spike_monitor)


def _start_logging(args, ctx: DistributedContext, run_config: dict, argv: list[str],
                   resumed_step: int | None) -> RunLogger:
    """Write the run record and open metrics.jsonl (+ wandb when wanted) on rank 0: the run's first writes,
    so every check must come before. A resumed run first drops the lines logged past its checkpoint."""
    wandb_settings = None
    if ctx.is_main:
        if resumed_step is not None:
            truncate_metrics(args.save_dir, after_step=resumed_step)
        write_run_record(args.save_dir, run_config, argv)
        if wandb_wanted(args.unset_wandb):
            tags = [tag for tag in args.tags.split(",") if tag] if args.tags else None
            wandb_settings = WandbSettings(project=args.project, name=args.name, entity=args.entity, tags=tags)
    return RunLogger(args.save_dir, is_main=ctx.is_main, run_config=run_config, wandb_settings=wandb_settings,
                     resume=args.continue_from is not None)


def _data_counts(batches: ResumableBatches, ctx: DistributedContext) -> dict[str, int]:
    """Rows skipped and documents cut, over all ranks (one all-reduce, at the end of the run)."""
    counts = batches.data_counts()
    totals = all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.float64, device=ctx.device), ctx)
    return dict(zip(counts, map(int, totals.tolist())))


def _execute(prepared: _PreparedRun) -> RunResult:
    ctx, logger = prepared.ctx, prepared.logger
    try:
        state = prepared.trainer.train()
        final = prepared.evaluate_now()
        final.update(final_eval_loss=final["eval_loss"], final_eval_tokens=final["eval_tokens"],
                     **_data_counts(prepared.trainer.batches, ctx))
        logger.log(final, step=state.update_step)
    finally:
        logger.close()
    save_dir = Path(prepared.args.save_dir)
    print0(ctx, f"Final eval: loss {final['eval_loss']:.4f}, perplexity {final['eval_ppl']:.2f} over "
                f"{final['eval_tokens']:,} tokens (reference estimator, the papers' sum of batch mean losses over "
                f"batches + 1: {final['eval_loss_reference']:.4f})")
    if final["documents_skipped"]:
        print0(ctx, f"Skipped {final['documents_skipped']:,} rows without a string 'text' field (counted on every "
                    "pass over the data)")
    if final["documents_truncated"]:
        print0(ctx, f"Cut {final['documents_truncated']:,} documents to --max_length {prepared.args.max_length} "
                    "tokens; --packing keeps every token")
    print0(ctx, f"Metrics: {save_dir / 'metrics.jsonl'}  checkpoints: {save_dir}/model_<step>/")
    return RunResult(final_metrics=final, state=state, save_dir=save_dir, model=prepared.model)
