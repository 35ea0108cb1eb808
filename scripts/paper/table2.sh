#!/usr/bin/env bash
# Stable-SPAM Table 2 (BF16 pretraining, 1.1B/2.2B/6.4B/11.6B tokens): one cell per call, e.g.
#   scripts/paper/table2.sh stablespam 130m [main_pretrain.py flags ...]
#   OPTIMIZER: adam adam_clip adafactor spam stablespam   SIZE: 60m 130m 350m 1b
# Environment and dry run (DRY_RUN=1 or --dry-run): see launch.sh.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "table2.sh: usage: table2.sh OPTIMIZER SIZE [main_pretrain.py flags ...]" >&2
    exit 2
fi
exec "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "t2-bf16-$2-$1" "${@:3}"
