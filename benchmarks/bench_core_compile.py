"""Cold-compile time of the compiled StableSPAM / SPAM cores as the model gets deeper.

One `step()` of `StableSPAM(compile=True)` (or SPAM) on the parameter shapes of a LLaMA config, with its layer
count overridden, inductor's caches off: the compile cost a new run pays. Since the cores run one layer-sized
chunk at a time (galore_torch/chunking.py) it should not grow with the number of layers.

    python benchmarks/bench_core_compile.py --config configs/llama_9m.json --layers 2 8 24 --threads 1
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from bench_optimizer_step import llama_shapes, make_params  # the sibling script (this folder is on sys.path)

from galore_torch import SPAM, StableSPAM


OPTIMIZERS = {"stablespam": StableSPAM, "spam": SPAM}


def one_compile(config: dict, layers: int, optimizer: str) -> None:
    """In this process (a fresh one per measurement, so nothing is cached in memory either)."""
    inductor_config.force_disable_caches = True
    params = make_params(llama_shapes({**config, "num_hidden_layers": layers}), torch.float32, torch.device("cpu"))
    step = OPTIMIZERS[optimizer](list(params.values()), lr=1e-3, compile=True)
    start = time.perf_counter()
    step.step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step.step()
    print(json.dumps({"layers": layers, "tensors": len(params), "first_step_s": first,
                      "second_step_s": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/llama_9m.json"))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="stablespam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child's measurement
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(args.config.read_text())
    if args.one is not None:
        one_compile(config, args.one, args.optimizer)
        return
    print(f"{args.config.name}, {args.optimizer}, compiled core, inductor caches off, {args.threads} thread(s)")
    print("| layers | tensors | first step (compile) s | second step s |\n|---|---|---|---|")
    for layers in args.layers:
        done = subprocess.run([sys.executable, __file__, "--config", str(args.config), "--optimizer", args.optimizer,
                               "--threads", str(args.threads), "--one", str(layers)],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {row['layers']} | {row['tensors']} | {row['first_step_s']:.1f} | {row['second_step_s']:.2f} |")


if __name__ == "__main__":
    main()
