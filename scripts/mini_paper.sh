#!/usr/bin/env bash
# The papers' optimizer comparison at laptop scale, on the built-in sample corpus, on CPU.
#
# Grid: Adam, Adam+GradClip, SPAM, StableSPAM (reference and corrected) x full precision (fp32), INT4 and
# FP4 simulation x 3 seeds, plus a learning-rate sweep of Adam and StableSPAM in INT4 (seed 0), plus both
# StableSPAM variants in INT4 with a momentum reset every 25 updates (3 seeds): with the papers' interval
# no reset happens in so short a run, and the variants differ only at resets. LLaMA-9M,
# 16 packed sequences of SEQ_LEN tokens per update (default 64), STEPS updates (default 100): about 100k
# training tokens per run. About 1.5-2 hours on a 2-core CPU shared with other work, PARALLEL=2 (one
# thread per run).
#
# Resumable: a run whose metrics.jsonl holds `final_eval_loss` is skipped; an unfinished run directory is
# removed and the run starts again (runs are short). Run names do not encode STEPS/SEQ_LEN: use another
# MINI_PAPER_DIR when you change them. Checkpoints are deleted when a run finishes to keep
# the disk small; metrics.jsonl and run_config.json stay.
#
#   bash scripts/mini_paper.sh                  # everything, then the table and the figures (exit 1 if a
#                                               # run failed: run it again to redo only those)
#   bash scripts/mini_paper.sh --dry-run        # print the runs still to do, write and train nothing
#                                               # (DRY_RUN=1 does the same)
#   STEPS=40 SEEDS="0" bash scripts/mini_paper.sh   # a quicker, smaller version
#   bash scripts/mini_paper.sh --publish        # into docs/mini_paper/, the committed results
#
# Writes runs/mini_paper/runs/<format>-<optimizer>-lr<lr>-s<seed>/ and, from them, runs/mini_paper/
# final_ppl.md and runs/mini_paper/figures/<format>/*.png; MINI_PAPER_DIR changes the place, and only
# --publish writes into docs/mini_paper/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DEFAULT=$ROOT/runs/mini_paper
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --publish) OUT_DEFAULT=$ROOT/docs/mini_paper ;;
    *) echo "mini_paper.sh: unknown argument $arg; use --dry-run and/or --publish (settings are variables: see the top of the script)" >&2; exit 2 ;;
  esac
done
DRY_RUN=${DRY_RUN:-0}
OUT=${MINI_PAPER_DIR:-$OUT_DEFAULT}
RUNS=$OUT/runs
PYTHON=${PYTHON:-python}
PARALLEL=${PARALLEL:-2}
STEPS=${STEPS:-100}
SEQ_LEN=${SEQ_LEN:-64}
SEEDS=${SEEDS:-"0 1 2"}
BASE_LR=${BASE_LR:-3e-3}
SWEEP_LRS=${SWEEP_LRS:-"1e-3 1e-2 3e-2"}
OPTIMIZERS="adam adam_clip spam stablespam stablespam_corrected"
FORMATS="fp32 int4 fp4"
WARMUP=$((STEPS / 10))

COMMON=(--model_config "$ROOT/configs/llama_9m.json" --dataset sample --batch_size 16 --total_batch_size 16
        --max_length "$SEQ_LEN" --packing --dtype float32 --scheduler cosine --min_lr_ratio 0.1
        --warmup_steps "$WARMUP" --num_training_steps "$STEPS" --eval_every $((STEPS / 3))
        --save_every 1000000 --eval_tokens 1000000 --workers 0 --unset_wandb)

# The presets of scripts/presets.py (shared with the paper launcher and the sweep): the Stable-SPAM 4-bit
# recipe for every format, SPAM's scripts' threshold, and the W4A4 formats the original code effectively ran
# (groups of 256, round-to-nearest). The momentum resets every 500 updates, longer than these runs, so no
# reset happens, except in the *_reset25 runs.
presets() { python3 "$ROOT/scripts/presets.py" "$@"; }
optimizer_flags() {
  case $1 in
    *_reset25) presets optimizer "${1%_reset25}" --recipe 4bit --steps "$STEPS" --reset 25 ;;
    stablespam*) presets optimizer "$1" --recipe 4bit --steps "$STEPS" --reset 500 ;;
    *) presets optimizer "$1" --recipe 4bit --steps "$STEPS" ;;
  esac
}
format_flags() { presets format "$1"; }

# Seed-major, with the learning-rate sweep right after the first seed, so a cut-short run still has every
# setting once.
plan() {
  local seed fmt opt lr
  for seed in $SEEDS; do
    for fmt in $FORMATS; do
      for opt in $OPTIMIZERS; do echo "$fmt $opt $BASE_LR $seed"; done
    done
    if [[ $seed == "${SEEDS%% *}" ]]; then
      for lr in $SWEEP_LRS; do
        for opt in adam stablespam; do echo "int4 $opt $lr $seed"; done
      done
    fi
  done
  for seed in $SEEDS; do
    for opt in stablespam_reset25 stablespam_corrected_reset25; do echo "int4 $opt $BASE_LR $seed"; done
  done
}

is_finished() { grep -q '"final_eval_loss"' "$1/metrics.jsonl" 2>/dev/null; }

run_one() {
  local fmt=$1 opt=$2 lr=$3 seed=$4
  local dir=$RUNS/$fmt-$opt-lr$lr-s$seed
  if is_finished "$dir"; then echo "done already: $dir"; return 0; fi
  # shellcheck disable=SC2046  # the preset flags are meant to split into words
  local cmd=("$PYTHON" "$ROOT/main_pretrain.py" "${COMMON[@]}" $(optimizer_flags "$opt") $(format_flags "$fmt")
             --lr "$lr" --seed "$seed" --save_dir "$dir")
  if [[ $DRY_RUN == 1 ]]; then echo "${cmd[*]}"; return 0; fi
  rm -rf "$dir" && mkdir -p "$dir"
  if OMP_NUM_THREADS=1 "${cmd[@]}" >"$dir/train.log" 2>&1; then
    rm -rf "$dir"/model_*
    echo "finished: $dir ($(grep -o 'perplexity [0-9.]*' "$dir/train.log" | tail -1))"
  else
    echo "FAILED: $dir (see $dir/train.log)" >&2
    return 1
  fi
}

# The finished runs among the given directories: an unfinished one must not enter the table with a
# mid-run perplexity.
finished() {
  local dir
  for dir in "$@"; do if is_finished "$dir"; then echo "$dir"; fi; done
}

export -f run_one presets optimizer_flags format_flags is_finished
export ROOT RUNS PYTHON STEPS BASE_LR DRY_RUN
export COMMON_LINE="${COMMON[*]}"

[[ $DRY_RUN == 1 ]] || mkdir -p "$RUNS"
# xargs runs each line in a fresh bash, which cannot inherit an array: rebuild COMMON from its line.
status=0
plan | xargs -P "$PARALLEL" -L 1 bash -c 'read -r -a COMMON <<<"$COMMON_LINE"; run_one "$@"' _ || status=$?
[[ $DRY_RUN == 1 ]] && exit "$status"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
plot() { "$PYTHON" "$ROOT/scripts/plot_runs.py" "$@" --smooth 0.8 >/dev/null; }
# shellcheck disable=SC2046  # one directory per line, no spaces in run names
plot $(finished "$RUNS"/*) --out "$OUT"
for fmt in $FORMATS; do
  # shellcheck disable=SC2046
  plot $(finished "$RUNS/$fmt"-{adam,adam_clip,spam,stablespam,stablespam_corrected}-lr"$BASE_LR"-s0) \
    --out "$OUT/figures/$fmt"
  rm -f "$OUT/figures/$fmt/final_ppl.md"
done
# shellcheck disable=SC2046
plot $(finished "$RUNS"/int4-{adam,stablespam}-lr*-s0) --out "$OUT/figures/lr_sweep"
mv "$OUT/figures/lr_sweep/final_ppl.md" "$OUT/lr_sweep_ppl.md"
rm -f "$OUT"/*.png
echo "Table: $OUT/final_ppl.md  LR sweep: $OUT/lr_sweep_ppl.md  figures: $OUT/figures/"
if ((status != 0)); then
  echo "mini_paper.sh: some runs failed (the FAILED lines above); run the script again to redo them" >&2
fi
exit "$status"
