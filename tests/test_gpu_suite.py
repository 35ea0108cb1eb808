"""benchmarks/gpu_suite.sh: its plan (checked here without a GPU) and how it reads an end-to-end run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_pretraining.args import parse_args

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """Import a script from benchmarks/ (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_suite = load_script(REPO / "benchmarks" / "gpu_suite.py")


def test_dry_run_prints_every_stage_of_the_plan(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                                           "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("GPU suite plan (11 stages")
    assert "-m gpu" in lines[1] and "gpu_ddp_smoke.py" in lines[2]
    assert sum("main_pretrain.py" in line and "--compile" in line for line in lines) == 6
    assert sum("bench_optimizer_step.py" in line and "llama_1b.json" in line for line in lines) == 2
    assert any("bench_quant_linear.py" in line and "bfloat16" in line and "llama_1b" in line for line in lines)
    assert not tmp_path.joinpath("gpu_suite.md").exists()  # a dry run writes nothing


def test_every_planned_training_command_parses(tmp_path):
    for stage in gpu_suite.plan(tmp_path):
        if stage.run_dir is None:
            continue
        argv = stage.command[stage.command.index("main_pretrain.py") + 1:]
        args = parse_args(argv)
        assert args.compile and args.packing and args.save_dir == str(stage.run_dir)
        assert (args.optimizer, args.act_quant) in (("adamw", False), ("stablespam", True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_suite_refuses_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--dry-run" in done.stderr


def test_end_to_end_figures_are_medians_after_the_first_updates(tmp_path):
    stage = gpu_suite.Stage("e2e test", [], 1, run_dir=tmp_path)
    records = [{"step": step, "loss": 10.0 - step, "tokens_per_s": 100.0 * step, "tflops": float(step),
                "mfu": step / 100, "peak_memory_gb": 2.0} for step in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = gpu_suite.e2e_figures(stage, "update 1 took 41.5 s (the first of this process: ...)")
    assert figures["tokens_per_s"] == 800.0  # median of updates 6..10
    assert figures["mfu"] == 0.08 and figures["first_update_s"] == 41.5 and figures["final_loss"] == 0.0
    assert gpu_suite.describe(figures) == ("800 tok/s, 8.0 TFLOP/s, MFU 8.0%, peak 2.0 GB, "
                                           "first update (compile) 42 s")
