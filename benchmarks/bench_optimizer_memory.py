"""Optimizer-state memory (exact bytes of the state tensors) and step time, fp32 against 8-bit states.

State bytes: params of a LLaMA config's shapes (untied embeddings) on the meta device, where nothing is
allocated, take one step; the bytes of every tensor in `optimizer.state` (numel x element size, 0-dim
counters included) are then summed. Step time: real float32 params on this device, timed in turns with
bench_optimizer_step.py's round robin.

    python benchmarks/bench_optimizer_memory.py --memory_configs configs/llama_1b.json configs/llama_7b.json \
        --time_config configs/llama_60m.json --threads 1 --clock cpu --steps 5
"""

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from bench_optimizer_step import ATTN_MLP, CLOCKS, llama_shapes, make_params, time_round_robin

from galore_torch.blockwise8bit import AdamW8bit
from galore_torch.spam import SPAM
from galore_torch.stable_spam import StableSPAM

Params = dict[str, torch.nn.Parameter]
# (name, factory over named params, name of the full-precision row it is compared with or None)
Row = tuple[str, Callable[[Params], torch.optim.Optimizer], str | None]
GALORE_RANKS = (128, 256, 512)


def rows() -> list[Row]:
    """Every optimizer measured: ours, then the GaLore rows when the GaLore optimizers import."""
    def flat(params: Params) -> list[torch.nn.Parameter]:
        return list(params.values())

    return [
        ("AdamW (torch)", lambda params: torch.optim.AdamW(flat(params), lr=1e-3, foreach=True), None),
        ("AdamW8bit", lambda params: AdamW8bit(flat(params), lr=1e-3), "AdamW (torch)"),
        ("StableSPAM", lambda params: StableSPAM(flat(params), lr=1e-3, total_T=20000), None),
        ("StableSPAM 8-bit", lambda params: StableSPAM(flat(params), lr=1e-3, total_T=20000, state_bits=8),
         "StableSPAM"),
        # no density group: its masks (1 byte per matrix entry) are drawn by a CPU randperm per matrix, minutes
        # at 7B shapes, and are the same with either state_bits
        ("SPAM", lambda params: SPAM(flat(params), lr=1e-3), None),
        ("SPAM 8-bit", lambda params: SPAM(flat(params), lr=1e-3, state_bits=8), "SPAM"),
    ] + galore_rows()


def compiled_rows() -> list[Row]:
    """Timed only (state bytes equal the eager rows'): compile=True, the (de)quantization compiled too."""
    def flat(params: Params) -> list[torch.nn.Parameter]:
        return list(params.values())

    return [
        ("AdamW8bit compiled", lambda params: AdamW8bit(flat(params), lr=1e-3, compile=True), None),
        ("StableSPAM compiled", lambda params: StableSPAM(flat(params), lr=1e-3, total_T=20000, compile=True), None),
        ("StableSPAM 8-bit compiled", lambda params: StableSPAM(flat(params), lr=1e-3, total_T=20000, state_bits=8,
                                                                compile=True), None),
        ("SPAM 8-bit compiled", lambda params: SPAM(flat(params), lr=1e-3, state_bits=8, compile=True), None),
    ]


def galore_groups(params: Params, rank: int) -> list[dict]:
    """The reference's GaLore grouping: attention/MLP matrices projected to rank `rank`, the rest plain."""
    matrices = [p for name, p in params.items() if name.rsplit(".", 1)[-1] in ATTN_MLP]
    rest = [p for name, p in params.items() if name.rsplit(".", 1)[-1] not in ATTN_MLP]
    return [{"params": rest},
            {"params": matrices, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]


def galore_rows() -> list[Row]:
    """HOOK for the GaLore branch: GaLoreAdamW at each rank, GaLoreAdamW8bit and GaLore-StableSPAM at r=512,
    each compared with AdamW. Edit the class names here if the merged branch spells them differently."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as error:
        print(f"note: GaLore rows skipped ({error})")
        return []
    import galore_torch

    found = [(f"GaLoreAdamW r={rank}", GaLoreAdamW, rank) for rank in GALORE_RANKS]
    for class_name, label in (("GaLoreAdamW8bit", "GaLoreAdamW8bit r=512"),
                              ("GaLoreStableSPAM", "GaLore-StableSPAM r=512")):
        if hasattr(galore_torch, class_name):
            found.append((label, getattr(galore_torch, class_name), 512))
        else:
            print(f"note: {label} row skipped (galore_torch has no {class_name})")
    return [(label, lambda params, cls=cls, rank=rank: cls(galore_groups(params, rank), lr=1e-3), "AdamW (torch)")
            for label, cls, rank in found]


def state_bytes(optimizer: torch.optim.Optimizer, prefix: str = "") -> int:
    """Bytes of every tensor in the optimizer's state whose key starts with `prefix`."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for key, value in state.items() if isinstance(value, torch.Tensor) and key.startswith(prefix))


def measure_state(row: Row, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(all state bytes, Adam-moment bytes: codes and absmax included) after one step on meta-device params."""
    _, factory, _ = row
    params = {name: torch.nn.Parameter(torch.empty(shape, device="meta")) for name, shape in shapes.items()}
    for p in params.values():
        p.grad = torch.empty_like(p)
    optimizer = factory(params)
    optimizer.step()
    return state_bytes(optimizer), state_bytes(optimizer, "exp_avg")


def memory_table(config: Path, table_rows: list[Row]) -> None:
    shapes = llama_shapes(json.loads(config.read_text()))
    numel = sum(torch.Size(shape).numel() for shape in shapes.values())
    measured = {}
    for row in table_rows:
        try:
            measured[row[0]] = measure_state(row, shapes)
        except NotImplementedError as error:  # an op without a meta kernel (e.g. an SVD)
            print(f"note: {row[0]} has no meta-device step ({error}); row skipped")
    print(f"\n{config.name}: {len(shapes)} tensors, {numel / 1e6:.0f}M params\n\n"
          "| optimizer | state bytes | GiB | bytes/param | vs AdamW | vs its fp32 row | Adam moments vs its fp32 "
          "row |\n|---|---|---|---|---|---|---|")
    for name, _, baseline in table_rows:
        if name not in measured:
            continue
        (size, moments), adamw = measured[name], measured["AdamW (torch)"][0]
        versus = "- | -" if baseline not in measured else \
            f"{100 * size / measured[baseline][0]:.1f}% | {100 * moments / measured[baseline][1]:.1f}%"
        print(f"| {name} | {size:,} | {size / 2**30:.2f} | {size / numel:.3f} | {100 * size / adamw:.1f}% | "
              f"{versus} |")


FUSED_ADAMW: Row = ("AdamW fused (torch)", lambda params: torch.optim.AdamW(list(params.values()), lr=1e-3,
                                                                            fused=True), None)


def time_table(config: Path, table_rows: list[Row], steps: int, warmup: int, clock: str) -> None:
    """Step times against torch's fused AdamW (the first row). Rows that do not fit the shapes (a GaLore rank
    at or above a matrix's smaller side) are named and left out."""
    params = make_params(llama_shapes(json.loads(config.read_text())), torch.float32, torch.device("cpu"))
    built = []
    for name, factory, _ in [FUSED_ADAMW, *table_rows]:
        try:
            built.append((name, factory(params)))
        except ValueError as error:
            print(f"note: {name} left out of the step times ({error})")
    samples = time_round_robin([optimizer for _, optimizer in built], warmup, steps, torch.device("cpu"),
                               CLOCKS[clock])
    medians, minima = [statistics.median(times) for times in samples], [min(times) for times in samples]
    print(f"\n{config.name}: step time, {torch.get_num_threads()} threads, {clock} clock, {steps} steps\n\n"
          "| optimizer | median ms/step | min ms/step | vs fused AdamW (min) |\n|---|---|---|---|")
    for (name, _), median, minimum in zip(built, medians, minima):
        print(f"| {name} | {median:.0f} | {minimum:.0f} | {minimum / minima[0]:.2f}x |")


def galore_svd_steps(config: Path, clock: str, gap: int = 200) -> None:
    """GaLoreAdamW's step that recomputes the projections (an SVD per matrix) against its plain step, and
    the step time amortised over `gap` steps (the reference's update_proj_gap 200)."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as error:
        print(f"note: GaLore SVD steps skipped ({error})")
        return
    timer = CLOCKS[clock]
    print(f"\n{config.name}: GaLoreAdamW's SVD step, {clock} clock\n\n"
          f"| rank | SVD step ms | plain step ms | amortised over {gap} ms |\n|---|---|---|---|")
    for rank in (128, 256):
        params = make_params(llama_shapes(json.loads(config.read_text())), torch.float32, torch.device("cpu"))
        optimizer = GaLoreAdamW(galore_groups(params, rank), lr=1e-3)
        times = []
        for _ in range(3):
            start = timer()
            optimizer.step()
            times.append(1e3 * (timer() - start))
        svd, plain = times[0], min(times[1:])
        print(f"| {rank} | {svd:.0f} | {plain:.0f} | {(svd + (gap - 1) * plain) / gap:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory_configs", type=Path, nargs="*",
                        default=[Path("configs/llama_1b.json"), Path("configs/llama_7b.json")],
                        help="LLaMA configs whose state bytes are measured (meta device)")
    parser.add_argument("--time_config", type=Path, default=Path("configs/llama_60m.json"),
                        help="LLaMA config whose step time is measured; 'none' skips timing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens there)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall, or this process's CPU time (steadier on a shared machine; use with --threads 1)")
    args = parser.parse_args()
    for config in [*args.memory_configs, *([] if str(args.time_config) == "none" else [args.time_config])]:
        if not config.is_file():
            raise FileNotFoundError(f"{config}: no such file; pass a configs/llama_*.json")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    table_rows = rows()
    print(f"torch {torch.__version__}")
    for config in args.memory_configs:
        memory_table(config, table_rows)
    if str(args.time_config) != "none":
        time_table(args.time_config, table_rows + compiled_rows(), args.steps, args.warmup, args.clock)
        galore_svd_steps(args.time_config, args.clock)


if __name__ == "__main__":
    main()
