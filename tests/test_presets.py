"""scripts/presets.py, the one preset table of the launchers: its formats are the W4A4 settings the
quantization package defines, its optimizers are registered ones, and its checkpoint rule is the run's."""

import subprocess
import sys
from pathlib import Path

import pytest

from galore_torch import OPTIMIZERS as REGISTRY
from peft_pretraining.args import parse_args
from peft_pretraining.checkpoint import complete_checkpoints
from peft_pretraining.model import quant_configs_from_args
from quantization import W4A4_FORMATS

PRESETS = Path(__file__).resolve().parents[1] / "scripts" / "presets.py"
sys.path.insert(0, str(PRESETS.parent))
import presets  # noqa: E402  (scripts/ is not a package)

# Preset format -> the quantization package's W4A4 format it must select (None: full precision).
FORMAT_OF_PRESET = {"bf16": None, "fp32": None, "int4": "int", "fp4": "fp4_ref", "mxfp4": "mxfp4", "nvfp4": "nvfp4"}


def run_presets(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PRESETS), *argv], capture_output=True, text=True, check=False)


def run_args(flags: list[str]):
    return parse_args(["--model_config", "c.json", "--batch_size", "1", *flags])


@pytest.mark.parametrize("name", presets.FORMATS)
def test_format_presets_select_the_quantization_packages_w4a4_configs(name):
    expected = W4A4_FORMATS[FORMAT_OF_PRESET[name]] if FORMAT_OF_PRESET[name] else (None, None)
    assert quant_configs_from_args(run_args(presets.format_flags(name))) == expected


@pytest.mark.parametrize("name", [*presets.OPTIMIZERS, *presets.STABLESPAM_PRESETS])
def test_optimizer_presets_name_registered_optimizers(name):
    args = run_args(presets.optimizer_flags(name, recipe="4bit", steps="100"))
    assert args.optimizer in REGISTRY


def test_the_command_line_prints_flags_and_refuses_in_one_line():
    done = run_presets("optimizer", "stablespam_corrected", "--format", "int4", "--steps", "10", "--reset", "25")
    assert done.stdout.split() == ["--optimizer", "stablespam", "--gamma1", "0.7", "--gamma2", "0.9", "--gamma3",
                                   "0.999", "--update_proj_gap", "25", "--total_T", "10", "--optimizer_variant",
                                   "corrected"]
    refused = run_presets("optimizer", "adam", "--reset", "5")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "only spam and stablespam" in refused.stderr


def test_newest_checkpoint_is_the_runs_newest_complete_one(tmp_path):
    for step, complete in ((2, True), (10, True), (30, False)):
        (tmp_path / f"model_{step}").mkdir()
        if complete:
            (tmp_path / f"model_{step}" / "training_state.json").write_text("{}")
    (tmp_path / "model_x").mkdir()
    assert list(complete_checkpoints(tmp_path)) == [2, 10]
    assert run_presets("newest-checkpoint", str(tmp_path)).stdout == "10\n"
    assert run_presets("newest-checkpoint", str(tmp_path / "absent")).stdout == "\n"
