"""galore_torch and quantization stay torch-only and independent (DESIGN.md: a user can copy either)."""

import subprocess
import sys

import pytest

FORBIDDEN = {
    "galore_torch": ["quantization", "peft_pretraining", "transformers", "datasets", "wandb"],
    "quantization": ["galore_torch", "peft_pretraining", "transformers", "datasets", "wandb"],
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_torch(package):
    code = (
        f"import sys, {package}\n"
        f"bad = [m for m in {FORBIDDEN[package]!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} imported {out.stdout.strip()}"
