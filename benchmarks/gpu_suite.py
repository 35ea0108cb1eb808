"""The GPU suite: everything we check on one CUDA GPU, as one script that fits a short machine lease.

Stages, most informative first, each under its own time limit and all under `--budget` seconds (a stage
that would start past the budget is listed as skipped):

1. the `gpu`-marked tests;
2. a one-GPU nccl DDP smoke run (benchmarks/gpu_ddp_smoke.py);
3. end-to-end `main_pretrain.py --compile` on the built-in sample corpus (packed 1024-token sequences),
   LLaMA-350M, 130M and 60M, each in BF16 (fused AdamW) and INT4 W4A4 (StableSPAM): tokens/s, TFLOP/s, MFU and
   peak memory (medians over the updates after the first few), and the first update's time (compilation);
4. the optimizer step benchmark on LLaMA-1B shapes, fp32 and bf16 parameters, against fused AdamW;
5. the QuantLinear benchmark, bf16, compiled, on LLaMA-1B projection shapes.

Writes `OUT/gpu_suite.md` (one summary table, then each benchmark's own table) and a log per stage.

    bash benchmarks/gpu_suite.sh                # on a machine with one CUDA GPU
    bash benchmarks/gpu_suite.sh --dry-run      # anywhere: print the plan
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2E_SIZES = ("350m", "130m", "60m")
E2E_UPDATES = 30
E2E_SKIPPED_UPDATES = 5  # the first updates (compilation, allocator warm-up) are left out of the medians
# Tokens per update and data settings of the end-to-end runs: full 1024-token sequences, no padding.
E2E_COMMON = ("--dataset", "sample", "--tokenizer", "builtin", "--packing", "--max_length", "1024",
              "--batch_size", "16", "--dtype", "bfloat16", "--lr", "1e-3", "--warmup_steps", "3",
              "--num_training_steps", str(E2E_UPDATES), "--eval_every", "1000000", "--save_every", "1000000",
              "--eval_tokens", "16K", "--workers", "4", "--unset_wandb", "--compile")
E2E_FORMATS = {
    "bf16": ("--optimizer", "adamw"),
    "int4": ("--optimizer", "stablespam", "--act_quant", "--weight_bits", "4"),
}


@dataclass
class Stage:
    name: str
    command: list[str]
    timeout: int  # seconds
    run_dir: Path | None = None  # end-to-end runs: their save_dir
    result: dict = field(default_factory=dict)


def plan(out: Path) -> list[Stage]:
    python = sys.executable
    stages = [Stage("gpu tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 180),
              Stage("nccl DDP smoke", [python, "benchmarks/gpu_ddp_smoke.py"], 120)]
    for size in E2E_SIZES:
        for fmt, flags in E2E_FORMATS.items():
            run_dir = out / "runs" / f"{size}-{fmt}"
            command = [python, "main_pretrain.py", "--model_config", f"configs/llama_{size}.json", *E2E_COMMON,
                       *flags, "--save_dir", str(run_dir)]
            stages.append(Stage(f"e2e {size} {fmt}", command, 240, run_dir=run_dir))
    for dtype in ("float32", "bfloat16"):
        stages.append(Stage(f"optimizer step 1B {dtype}",
                            [python, "benchmarks/bench_optimizer_step.py", "--config", "configs/llama_1b.json",
                             "--device", "cuda", "--dtype", dtype, "--steps", "10", "--warmup", "3"], 180))
    stages.append(Stage("QuantLinear 1B bf16",
                        [python, "benchmarks/bench_quant_linear.py", "--config", "configs/llama_1b.json",
                         "--device", "cuda", "--dtype", "bfloat16", "--compile", "--rounds", "10"], 120))
    return stages


def e2e_figures(stage: Stage, output: str) -> dict:
    """Medians of the cost figures over the updates after the first few, and the first update's time."""
    lines = [json.loads(line) for line in (stage.run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in lines if "loss" in r and r["step"] > E2E_SKIPPED_UPDATES]
    figures = {key: statistics.median(r[key] for r in updates)
               for key in ("tokens_per_s", "tflops", "mfu", "peak_memory_gb") if updates and key in updates[0]}
    first = re.search(r"update 1 took ([0-9.]+) s", output)
    if first:
        figures["first_update_s"] = float(first.group(1))
    figures["final_loss"] = updates[-1]["loss"] if updates else None
    return figures


def describe(figures: dict) -> str:
    parts = []
    if "tokens_per_s" in figures:
        parts.append(f"{figures['tokens_per_s']:,.0f} tok/s")
    if "tflops" in figures:
        parts.append(f"{figures['tflops']:.1f} TFLOP/s")
    if "mfu" in figures:
        parts.append(f"MFU {figures['mfu']:.1%}")
    if "peak_memory_gb" in figures:
        parts.append(f"peak {figures['peak_memory_gb']:.1f} GB")
    if "first_update_s" in figures:
        parts.append(f"first update (compile) {figures['first_update_s']:.0f} s")
    return ", ".join(parts)


def run_stage(stage: Stage, out: Path) -> str:
    """Run one stage, log its output, and return that output ('' when it timed out)."""
    log = out / (re.sub(r"[^A-Za-z0-9]+", "_", stage.name).strip("_") + ".log")
    start = time.perf_counter()
    try:
        done = subprocess.run(stage.command, cwd=REPO, capture_output=True, text=True, timeout=stage.timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                                   "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"})
        output = done.stdout + done.stderr
        stage.result["status"] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) \
            else (expired.stdout or "")
        stage.result["status"] = f"timed out after {stage.timeout} s"
    stage.result["seconds"] = time.perf_counter() - start
    log.write_text(output)
    return output


def report(stages: list[Stage], outputs: dict[str, str], header: str) -> str:
    rows = [f"# GPU suite\n\n{header}\n", "| stage | status | seconds | figures |", "|---|---|---|---|"]
    for stage in stages:
        result = stage.result
        seconds = f"{result['seconds']:.0f}" if "seconds" in result else ""
        rows.append(f"| {stage.name} | {result.get('status', 'not run')} | {seconds} | "
                    f"{result.get('figures', '')} |")
    sections = []
    for stage in stages:
        tables = [line for line in outputs.get(stage.name, "").splitlines()
                  if line.startswith("|") or "passed" in line or "smoke" in line or "->" in line]
        if tables and stage.run_dir is None:
            sections.append(f"\n## {stage.name}\n\n" + "\n".join(tables))
    return "\n".join(rows) + "\n" + "\n".join(sections) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (works without a GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_suite", help="results directory")
    parser.add_argument("--budget", type=float, default=470.0,
                        help="seconds for the whole suite; stages that would start later are skipped")
    args = parser.parse_args()
    stages = plan(args.out)
    if args.dry_run:
        print(f"GPU suite plan ({len(stages)} stages, budget {args.budget:.0f} s, results in {args.out}):")
        for number, stage in enumerate(stages, 1):
            print(f"{number:2}. {stage.name} (limit {stage.timeout} s): {shlex.join(stage.command)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU visible; run it on a GPU machine, or pass --dry-run to see the plan",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    outputs = {}
    started = time.perf_counter()
    for stage in stages:
        if time.perf_counter() - started + 30 > args.budget:
            stage.result["status"] = "skipped (budget)"
            continue
        stage.timeout = int(min(stage.timeout, args.budget - (time.perf_counter() - started)))
        print(f"== {stage.name}", flush=True)
        outputs[stage.name] = run_stage(stage, args.out)
        if stage.run_dir is not None and (stage.run_dir / "metrics.jsonl").is_file():
            stage.result["figures"] = describe(e2e_figures(stage, outputs[stage.name]))
        print(f"   {stage.result['status']} in {stage.result['seconds']:.0f} s {stage.result.get('figures', '')}",
              flush=True)
    text = report(stages, outputs, header)
    (args.out / "gpu_suite.md").write_text(text)
    print(text)
    return 0 if all(s.result.get("status") == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
