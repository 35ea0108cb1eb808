#!/usr/bin/env bash
# The GPU suite on a machine with one CUDA GPU (under 8 minutes, compilation included); `--dry-run` prints
# the plan anywhere. See benchmarks/gpu_suite.py for the stages; results land in runs/gpu_suite/gpu_suite.md.
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [--out DIR] [--budget SECONDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" benchmarks/gpu_suite.py "$@"
