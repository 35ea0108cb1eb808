"""Overhead of our training loop over a bare forward/backward/step loop (CPU by default).

Both loops train the same model with the same optimizer on the same pre-tokenised in-memory batches, in the
same process; data loading, evaluation and checkpoints are excluded. Our side is the real `Trainer` with its
logging on (metrics.jsonl, progress bar, one host sync per update, grad-norm, LR schedule). The two loops
alternate in short rounds (ABBA order) so that load from other processes hits both alike; the overhead is the
median of the per-pair time ratios, and also computed from each loop's fastest round. On a shared machine
`--threads 1 --clock cpu` (this process's CPU time) is the least disturbed measure; wall clock is the default.

    python benchmarks/bench_train_overhead.py                       # llama_9m, batch 8 x 256, fp32
    python benchmarks/bench_train_overhead.py --threads 1 --clock cpu
    python benchmarks/bench_train_overhead.py --dtype bf16_mixed --model_config configs/llama_20m.json
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from peft_pretraining.distributed import DistributedContext
from peft_pretraining.metrics import RunLogger
from peft_pretraining.model import build_model, load_llama_config
from peft_pretraining.schedules import build_scheduler
from peft_pretraining.trainer import Trainer, TrainSettings

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_config", default=str(REPO / "configs" / "llama_9m.json"))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "bf16_mixed"))
    p.add_argument("--steps", type=int, default=3, help="updates per round")
    p.add_argument("--rounds", type=int, default=12, help="rounds of each loop (even: ABBA pairs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates of each loop first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time")
    return p.parse_args()


def make_batches(count: int, batch_size: int, max_length: int, vocab_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (count, batch_size, max_length), generator=generator)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def minimal_loop(model, optimizer, batches, autocast) -> None:
    """What every training loop must do, and nothing else."""
    for batch in batches:
        with autocast():
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainer_loop(model, optimizer, scheduler, batches, logger, autocast_dtype) -> None:
    ctx = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    settings = TrainSettings(num_training_steps=len(batches), accumulation_steps=1,
                             total_batch_size=batches[0]["input_ids"].shape[0], autocast_dtype=autocast_dtype,
                             eval_every=10**9, save_every=10**9)
    Trainer(model=model, optimizer=optimizer, scheduler=scheduler, batches=batches, settings=settings, ctx=ctx,
            logger=logger).train()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(fn) -> float:
        start = clock()
        fn()
        return clock() - start

    config = load_llama_config(args.model_config, max_length=args.max_length)
    torch.manual_seed(0)
    model, _ = build_model(config, dtype=args.dtype, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = build_scheduler(optimizer, "cosine", num_training_steps=10**6, warmup_steps=10, min_lr_ratio=0.1)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16_mixed" else None

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=autocast_dtype)

    batches = make_batches(args.steps, args.batch_size, args.max_length, config.vocab_size)
    tokens = args.steps * args.batch_size * args.max_length
    with tempfile.TemporaryDirectory() as run_dir:
        logger = RunLogger(run_dir, is_main=True, run_config={})
        loops = {"trainer": lambda: trainer_loop(model, optimizer, scheduler, batches, logger, autocast_dtype),
                 "minimal": lambda: minimal_loop(model, optimizer, batches, autocast)}
        minimal_loop(model, optimizer, batches[: args.warmup], autocast)
        trainer_loop(model, optimizer, scheduler, batches[: args.warmup], logger, autocast_dtype)
        seconds = {"trainer": [], "minimal": []}
        for round_index in range(args.rounds):
            order = ("trainer", "minimal") if round_index % 2 == 0 else ("minimal", "trainer")
            for name in order:
                seconds[name].append(timed(loops[name]))
        logger.close()

    ratios = [ours / minimal for ours, minimal in zip(seconds["trainer"], seconds["minimal"], strict=True)]
    print(f"\nmodel {Path(args.model_config).name}, batch {args.batch_size} x {args.max_length}, {args.dtype}, "
          f"AdamW, {torch.get_num_threads()} threads, {args.clock} clock, {args.rounds} rounds x {args.steps} "
          "updates per loop")
    print(f"{'loop':<10}{'median tok/s':>14}{'best tok/s':>12}   per round")
    for name in ("minimal", "trainer"):
        rates = [tokens / s for s in seconds[name]]
        print(f"{name:<10}{statistics.median(rates):>14,.0f}{max(rates):>12,.0f}   "
              f"{' '.join(f'{r:,.0f}' for r in rates)}")
    best_ratio = min(seconds["trainer"]) / min(seconds["minimal"])
    print(f"overhead (time per token): median of pairs {100 * (statistics.median(ratios) - 1):+.1f}%, "
          f"best rounds {100 * (best_ratio - 1):+.1f}% (target < 5%)")

if __name__ == "__main__":
    main()
