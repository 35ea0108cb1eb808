"""Tokens/s of the training loop: eager vs `--compile` vs a bare compiled loop (CPU by default).

For each setting (INT4 W4A4 + StableSPAM, the papers' 4-bit recipe; and plain fp32 AdamW) three loops train
on the same pre-tokenised in-memory batches in one process:

- `eager`:    our `Trainer` (logging on: metrics.jsonl, progress bar, grad norm, LR schedule, cost figures,
              one host sync per update) over the eager model and optimizer: `main_pretrain.py` without --compile;
- `compiled`: the same `Trainer` over `compile_layers(model)` and the optimizer `main_pretrain.py --compile`
              builds (StableSPAM's compiled core, fused AdamW);
- `bare`:     forward, backward, step, zero_grad and nothing else, over the same compiled model and optimizer
              as `compiled` (what our loop's bookkeeping is measured against).

Data loading, evaluation and checkpoints are excluded. Compilation is measured separately (the first update
of each compiled model, with inductor's caches off so it is a cold compile) and excluded from the rates.
The loops alternate in rounds (the order rotates each round) so that load from other processes hits them
alike; rates are medians over rounds. On a shared machine `--threads 1 --clock cpu` (this process's CPU
time) is the least disturbed measure.

    python benchmarks/bench_train_throughput.py --model_config configs/llama_60m.json --threads 1 --clock cpu
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from bench_train_overhead import make_batches  # the sibling script (this folder is on sys.path)

from galore_torch import StableSPAM
from peft_pretraining.distributed import DistributedContext
from peft_pretraining.metrics import RunLogger
from peft_pretraining.model import build_model, compile_layers, load_llama_config
from peft_pretraining.schedules import build_scheduler
from peft_pretraining.throughput import model_flops_per_token
from peft_pretraining.trainer import Trainer, TrainSettings
from quantization import W4A4_FORMATS

REPO = Path(__file__).resolve().parents[1]
ONE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
SETTINGS = ("int4_stablespam", "fp32_adamw")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_config", default=str(REPO / "configs" / "llama_20m.json"))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--steps", type=int, default=1, help="updates per round of each loop")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed updates of each loop first (compile included)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time")
    return p.parse_args()


def build(setting: str, config, compiled: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer main_pretrain.py builds for `setting`, with or without --compile."""
    torch.manual_seed(0)
    # The reference's --act_quant --weight_bits 4: INT4 weights (asymmetric, group 256) and activations
    # (symmetric, group 256, top-2 outliers kept).
    quant = W4A4_FORMATS["int"] if setting == "int4_stablespam" else (None, None)
    model, _ = build_model(config, dtype="float32", device=torch.device("cpu"), weight_quant=quant[0],
                           act_quant=quant[1])
    if compiled:
        compile_layers(model)
    if setting == "int4_stablespam":
        optimizer = StableSPAM(model.parameters(), lr=1e-3, gamma1=0.7, gamma2=0.9, gamma3=0.999,
                               update_proj_gap=1000, total_T=10**6, compile=compiled)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=compiled)
    return model, optimizer


def bare_loop(model, optimizer, batches) -> None:
    """What every training loop must do, and nothing else."""
    for batch in batches:
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainer_loop(model, optimizer, scheduler, batches, logger, flops_per_token) -> None:
    settings = TrainSettings(num_training_steps=len(batches), accumulation_steps=1,
                             total_batch_size=batches[0]["input_ids"].shape[0], eval_every=10**9,
                             save_every=10**9, flops_per_token=flops_per_token)
    Trainer(model=model, optimizer=optimizer, scheduler=scheduler, batches=batches, settings=settings,
            ctx=ONE_PROCESS, logger=logger).train()


def main() -> None:
    args = parse_args()
    inductor_config.force_disable_caches = True  # cold compiles: what a new run pays
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    config = load_llama_config(args.model_config, max_length=args.max_length)
    flops_per_token = model_flops_per_token(config, args.max_length)
    batches = make_batches(args.steps, args.batch_size, args.max_length, config.vocab_size)
    warmup_batches = make_batches(args.warmup, args.batch_size, args.max_length, config.vocab_size)
    tokens = args.steps * args.batch_size * args.max_length

    loops: dict[str, Callable[[list[dict]], None]] = {}
    compile_seconds = {}
    with tempfile.TemporaryDirectory() as run_dir:
        logger = RunLogger(run_dir, is_main=True, run_config={})
        for setting in SETTINGS:
            for compiled in (False, True):
                model, optimizer = build(setting, config, compiled)
                scheduler = build_scheduler(optimizer, "cosine", num_training_steps=10**6, warmup_steps=10,
                                            min_lr_ratio=0.1)
                name = f"{setting}/{'compiled' if compiled else 'eager'}"

                def ours(data, model=model, optimizer=optimizer, scheduler=scheduler):
                    trainer_loop(model, optimizer, scheduler, data, logger, flops_per_token)

                loops[name] = ours
                if compiled:
                    start = time.perf_counter()
                    bare_loop(model, optimizer, warmup_batches[:1])  # the first update compiles
                    compile_seconds[setting] = time.perf_counter() - start
                    loops[f"{setting}/bare"] = lambda data, model=model, optimizer=optimizer: \
                        bare_loop(model, optimizer, data)
        for loop in loops.values():
            loop(warmup_batches)
        seconds = {name: [] for name in loops}
        names = list(loops)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = clock()
                loops[name](batches)
                seconds[name].append(clock() - start)
        logger.close()

    rate = {name: statistics.median(tokens / s for s in times) for name, times in seconds.items()}
    print(f"\nmodel {Path(args.model_config).name}, batch {args.batch_size} x {args.max_length}, float32, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, {args.rounds} rounds x {args.steps} update(s)")
    print(f"{'loop':<28}{'median tok/s':>14}   per round")
    for name in names:
        print(f"{name:<28}{rate[name]:>14,.1f}   {' '.join(f'{tokens / s:,.1f}' for s in seconds[name])}")
    for setting in SETTINGS:
        print(f"{setting}: cold compile (first update, wall) {compile_seconds[setting]:.1f} s; "
              f"--compile / eager {rate[f'{setting}/compiled'] / rate[f'{setting}/eager']:.2f}x; "
              f"our loop's cost over the bare compiled loop "
              f"{100 * (rate[f'{setting}/bare'] / rate[f'{setting}/compiled'] - 1):+.1f}%")
    print(f"int4_stablespam --compile vs a bare compiled fp32 AdamW loop: "
          f"{rate['int4_stablespam/compiled'] / rate['fp32_adamw/bare']:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
