#!/usr/bin/env bash
# Stable-SPAM Table 1 (4-bit pretraining, 2.2B tokens): one cell per call, e.g.
#   scripts/paper/table1.sh stablespam int4 350m [main_pretrain.py flags ...]
#   OPTIMIZER: adam adam_clip adafactor spam stablespam   FORMAT: int4 fp4 (bf16: the Adam (BF16) row)
#   SIZE: 130m 350m 1b
# Environment and dry run (DRY_RUN=1 or --dry-run): see launch.sh.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    echo "table1.sh: usage: table1.sh OPTIMIZER FORMAT SIZE [main_pretrain.py flags ...]" >&2
    exit 2
fi
exec "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "t1-$2-$3-$1" "${@:4}"
