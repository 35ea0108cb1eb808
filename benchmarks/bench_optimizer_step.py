"""Time one optimizer `step()` on the parameter shapes of a LLaMA config, against torch's fused AdamW.

Parameters get fixed random gradients; each optimizer is warmed up (compilation included), then timed over
`--steps` steps taken in turns with the others: the median, and the minimum (the figure least disturbed by
other processes). Optimizer state memory sums the bytes of every tensor in `optimizer.state`.

    python benchmarks/bench_optimizer_step.py --config configs/llama_60m.json --steps 20
"""

import argparse
import inspect
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from galore_torch.stable_spam import StableSPAM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
ATTN_MLP = ("q", "k", "v", "o", "gate", "up", "down")


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a LlamaForCausalLM built from `config` (untied embeddings)."""
    vocab, hidden, inter = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    shapes = {"embed": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        for proj in ("q", "k", "v", "o"):
            shapes[f"layers.{layer}.{proj}"] = (hidden, hidden)
        shapes[f"layers.{layer}.gate"] = (inter, hidden)
        shapes[f"layers.{layer}.up"] = (inter, hidden)
        shapes[f"layers.{layer}.down"] = (hidden, inter)
        shapes[f"layers.{layer}.input_norm"] = (hidden,)
        shapes[f"layers.{layer}.post_attention_norm"] = (hidden,)
    shapes["norm"] = (hidden,)
    shapes["lm_head"] = (vocab, hidden)
    return shapes


def make_params(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                device: torch.device) -> dict[str, torch.nn.Parameter]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = {}
    for name, shape in shapes.items():
        p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator, dtype=dtype, device=device))
        p.grad = 1e-3 * torch.randn(shape, generator=generator, dtype=dtype, device=device)
        params[name] = p
    return params


def spam_groups(params: dict[str, torch.nn.Parameter], density: float) -> list[dict]:
    """The reference's SPAM grouping: attention/MLP matrices in the density group, the rest plain."""
    matrices = [p for name, p in params.items() if name.rsplit(".", 1)[-1] in ATTN_MLP]
    rest = [p for name, p in params.items() if name.rsplit(".", 1)[-1] not in ATTN_MLP]
    return [{"params": rest}, {"params": matrices, "density": density, "update_proj_gap": 500}]


def state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total / 2**20


def time_round_robin(optimizers: list[torch.optim.Optimizer], warmup: int, steps: int, device: torch.device,
                     clock: Callable[[], float]) -> list[list[float]]:
    """Milliseconds of each of `steps` timed `step()` calls per optimizer, after `warmup` untimed steps each.

    The timed steps take turns (one step of each optimizer per round), so that load from other processes
    shifts every row alike instead of whichever optimizer happened to run at the time.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for optimizer in optimizers:
        for _ in range(warmup):
            optimizer.step()
    sync()
    times: list[list[float]] = [[] for _ in optimizers]
    for _ in range(steps):
        for optimizer, samples in zip(optimizers, times):
            start = clock()
            optimizer.step()
            sync()
            samples.append(1e3 * (clock() - start))
    return times


def candidates(params: dict[str, torch.nn.Parameter]) -> list[tuple[str, Callable[[], torch.optim.Optimizer]]]:
    """(name, factory) of every optimizer to time; SPAM rows only when `galore_torch.spam` imports."""
    flat = list(params.values())
    rows = [
        ("AdamW fused (torch)", lambda: torch.optim.AdamW(flat, lr=1e-3, fused=True)),
        ("AdamW foreach (torch)", lambda: torch.optim.AdamW(flat, lr=1e-3, foreach=True)),
        ("StableSPAM eager", lambda: StableSPAM(flat, lr=1e-3, total_T=20000)),
        ("StableSPAM compiled", lambda: StableSPAM(flat, lr=1e-3, total_T=20000, compile=True)),
    ]
    try:
        from galore_torch.spam import SPAM
    except ImportError as error:
        print(f"note: SPAM rows skipped ({error})")
        return rows
    modes = {"eager": {}}
    if "compile" in inspect.signature(SPAM).parameters:
        modes["compiled"] = {"compile": True}
    for density in (1.0, 0.25):
        for mode, kwargs in modes.items():
            rows.append((f"SPAM density {density} {mode}",
                         lambda density=density, kwargs=kwargs: SPAM(spam_groups(params, density), lr=1e-3,
                                                                     **kwargs)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/llama_60m.json"),
                        help="LLaMA config JSON whose parameter shapes are used")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation happens there)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and gradient dtype")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall, or this process's CPU time (steadier on a shared machine; use with --threads 1)")
    args = parser.parse_args()
    if not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file; pass a configs/llama_*.json")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be >= 1")
    if args.warmup < 1:
        raise ValueError(f"--warmup {args.warmup}: must be >= 1 (the first step of a compiled row compiles)")

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = llama_shapes(json.loads(args.config.read_text()))
    params = make_params(shapes, DTYPES[args.dtype], device)
    numel = sum(p.numel() for p in params.values())
    print(f"{args.config.name}: {len(params)} tensors, {numel / 1e6:.1f}M params, {args.dtype}, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")

    names, factories = zip(*candidates(params))
    optimizers = [factory() for factory in factories]
    samples = time_round_robin(optimizers, args.warmup, args.steps, device, CLOCKS[args.clock])
    medians = [statistics.median(times) for times in samples]
    minima = [min(times) for times in samples]
    print("| optimizer | median ms/step | vs fused AdamW | min ms/step | vs fused AdamW | state MB |\n"
          "|---|---|---|---|---|---|")
    for name, median, minimum, optimizer in zip(names, medians, minima, optimizers):
        print(f"| {name} | {median:.1f} | {median / medians[0]:.2f}x | {minimum:.1f} | {minimum / minima[0]:.2f}x "
              f"| {state_megabytes(optimizer):.0f} |")


if __name__ == "__main__":
    main()
