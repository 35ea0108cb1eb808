"""Forward+backward time of QuantLinear (W4A4) against nn.Linear on LLaMA projection shapes (350M default).

    python benchmarks/bench_quant_linear.py [--dtype float32|bfloat16] [--device cpu|cuda] [--compile]
                                            [--config configs/llama_1b.json]

Variants are timed in interleaved rounds (one call of each per round) and the median per variant is
reported, so load from other processes spreads over all of them instead of skewing one. On a shared CPU,
`--threads 1 --clock cpu` (this process's CPU time) is the least disturbed measure; wall clock is the default.
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn

from quantization import W4A4_FORMATS, QuantLinear

# (in_features, out_features) of LLaMA-350M: attention projections, up/gate, down.
SHAPES = ((1024, 1024), (1024, 2736), (2736, 1024))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every layer (baseline too)")
    parser.add_argument("--config", default=None,
                        help="take the projection shapes from this LLaMA config JSON (default: LLaMA-350M's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--formats", nargs="+", choices=tuple(W4A4_FORMATS), default=tuple(W4A4_FORMATS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time")
    return parser.parse_args()


def projection_shapes(config_path: str | None) -> tuple[tuple[int, int], ...]:
    """(in, out) of the attention projections, up/gate and down of a LLaMA config."""
    if config_path is None:
        return SHAPES
    config = json.loads(open(config_path).read())
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    return (hidden, hidden), (hidden, intermediate), (intermediate, hidden)


def build_layers(shape, args, dtype) -> dict[str, nn.Module]:
    in_features, out_features = shape
    base = nn.Linear(in_features, out_features, device=args.device, dtype=dtype)
    layers = {"nn.Linear": base}
    for name in args.formats:
        weight_config, activation_config = W4A4_FORMATS[name]
        layers[name] = QuantLinear.from_linear(base, weight_config, activation_config)
    if args.compile:
        torch._dynamo.reset()  # all QuantLinears share one forward: stay under the recompile limit
        layers = {name: torch.compile(layer) for name, layer in layers.items()}
    return layers


def step_fn(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device, clock):
    def step() -> float:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        layer(x).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    return step


def bench_shape(shape, args, dtype) -> dict[str, float]:
    device = torch.device(args.device)
    in_features, out_features = shape
    x = torch.randn(args.batch, args.seq, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.batch, args.seq, out_features, device=device, dtype=dtype)
    layers = build_layers(shape, args, dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    steps = {name: step_fn(layer, x, grad, device, clock) for name, layer in layers.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step())
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, compile {args.compile}, "
        f"threads {torch.get_num_threads()}, tokens {args.batch}x{args.seq}, {args.clock} clock, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'shape (in->out)':<16} {'variant':<10} {'fwd+bwd ms':>11} {'ratio':>7}")
    for shape in projection_shapes(args.config):
        medians = bench_shape(shape, args, dtype)
        baseline = medians["nn.Linear"]
        for name, ms in medians.items():
            print(f"{f'{shape[0]}->{shape[1]}':<16} {name:<10} {ms:>11.2f} {ms / baseline:>6.2f}x")


if __name__ == "__main__":
    main()
