#!/usr/bin/env bash
# Launch one published cell of the Stable-SPAM paper by its id (the ids and their numbers: cells.tsv):
#
#   scripts/paper/launch.sh t1-int4-350m-stablespam [main_pretrain.py flags ...]
#   scripts/paper/launch.sh --list
#
# table1.sh / table2.sh name the same cells by optimizer, format and size. Extra flags go to main_pretrain.py
# after the cell's own, so they win (e.g. --workers 4, --unset_wandb). Flags that the run name or the batch split
# depend on are refused (use the variables below); --dataset, --optimizer_variant and --packing tag the run name.
#
# Relaunching the same cell resumes it: when the run directory holds a complete checkpoint
# (model_<step>/training_state.json), --continue_from <run dir> --restore_optimizer is added (also what makes a
# SLURM requeue continue). FRESH=1 insists on a fresh start and refuses a directory that holds checkpoints (move
# or delete it first: a new run among old checkpoints would resume from them later).
#
# Environment (all optional):
#   DRY_RUN=1 (or --dry-run)  print the resolved settings and the command, do not train
#   NGPU                      processes per node (default: the GPUs CUDA_VISIBLE_DEVICES or SLURM_GPUS_ON_NODE
#                             name, else those nvidia-smi lists, else 1)
#   NNODES                    nodes (default 1); more than one needs RDZV_ENDPOINT=host:port (torchrun c10d
#                             rendezvous, the same on every node) and optionally RDZV_ID (default: the run name)
#   BATCH_SIZE                micro-batch per GPU (default: per size, at most 512 / GPUs); the total batch stays
#                             512 sequences, the rest is gradient accumulation
#   SEED                      --seed (default 0), part of the run name
#   LR                        peak lr instead of the paper's, part of the run name
#   STEPS                     updates instead of the paper's (StableSPAM's total_T follows, and the warm-up
#                             becomes min(paper's, STEPS / 10)), part of the run name
#   WARMUP                    lr warm-up updates instead of the above, part of the run name
#   RESET                     spam/stablespam momentum-reset interval (--update_proj_gap) instead of the
#                             paper's, part of the run name
#   RUNS_DIR                  parent of the run directory (default runs/paper)
#   SAVE_EVERY                checkpoint every N updates (default 1000; the newest 2 are kept)
#   FRESH=1                   do not resume (see above)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
manifest="$here/cells.tsv"

# Settings every cell shares (StableSPAM README and scripts, docs/algorithms.md#f): 512 x 256 tokens per update,
# pure bf16, cosine to 0.1 x lr, no weight decay, eval every 1000 updates on 10M tokens.
TOTAL_BATCH=512
MAX_LENGTH=256
# Pass-through flags that would make the run name or the batch split stale. A prefix of one of these is refused
# too: main_pretrain.py would refuse it as well, but only after the launch.
REFUSED_FLAGS=(--lr --seed --num_training_steps --max_train_tokens --warmup_steps --update_proj_gap --optimizer
               --batch_size --total_batch_size --gradient_accumulation --max_length --save_dir --name)
# Pass-through flags that tag the run name; they must be spelled out so the tag cannot be missed.
TAGGING_FLAGS=(--dataset --optimizer_variant --packing)

die() { echo "launch.sh: $*" >&2; exit 2; }

list_cells() {
    printf '%-26s %-6s %-6s %-6s %s\n' cell lr steps tokens paper_ppl
    grep -v '^#' "$manifest" | tail -n +2 | while IFS=$'\t' read -r cell lr steps _ ppl tokens; do
        printf '%-26s %-6s %-6s %-6s %s\n' "$cell" "$lr" "$steps" "$tokens" "$ppl"
    done
}

# The fix to suggest for a refused flag.
refusal() {
    case "$1" in
        --lr) echo "pass the lr as LR=... (it is part of the run name)" ;;
        --seed) echo "pass the seed as SEED=... (it is part of the run name)" ;;
        --num_training_steps | --max_train_tokens) echo "pass the update count as STEPS=..." ;;
        --warmup_steps) echo "pass the warm-up as WARMUP=..." ;;
        --update_proj_gap) echo "pass the momentum-reset interval as RESET=..." ;;
        --optimizer) echo "the cell id names the optimizer" ;;
        --batch_size | --gradient_accumulation) echo "pass the micro-batch as BATCH_SIZE=..." ;;
        --total_batch_size | --max_length) echo "every cell trains on $TOTAL_BATCH x $MAX_LENGTH tokens per update" ;;
        --save_dir) echo "pass the parent directory as RUNS_DIR=... (the run name is derived)" ;;
        --name) echo "the run name is derived from the settings" ;;
    esac
}

# Refuse REFUSED_FLAGS and their prefixes, and prefixes of TAGGING_FLAGS.
check_passthrough() {
    local token flag refused tagging
    for token in "$@"; do
        flag="${token%%=*}"
        [[ $flag == --?* ]] || continue
        for refused in "${REFUSED_FLAGS[@]}"; do
            if [[ $refused == "$flag"* ]]; then
                [[ $flag == "$refused" ]] || die "$flag abbreviates $refused: $(refusal "$refused")"
                die "$(refusal "$refused"), not $token"
            fi
        done
        for tagging in "${TAGGING_FLAGS[@]}"; do
            if [[ $tagging == "$flag"* && $flag != "$tagging" ]]; then
                die "$flag abbreviates $tagging: spell it out, it tags the run name"
            fi
        done
    done
}

# The run-name tags of the pass-through flags (argparse's last-wins for repeated flags).
passthrough_tags() {
    local dataset="" variant="" packing="" previous="" token
    for token in "$@"; do
        case "$previous" in
            --dataset) dataset="$token" ;;
            --optimizer_variant) variant="$token" ;;
        esac
        case "$token" in
            --dataset=*) dataset="${token#*=}" ;;
            --optimizer_variant=*) variant="${token#*=}" ;;
            --packing) packing=1 ;;
        esac
        previous="$token"
    done
    dataset="$(basename "${dataset:-c4}")"
    [[ $dataset == c4 ]] || printf -- '-%s' "${dataset//[^A-Za-z0-9._]/_}"
    [[ $variant != corrected ]] || printf -- '-corrected'
    [[ -z $packing ]] || printf -- '-packed'
}

# GPUs on this node: the ones the scheduler or CUDA_VISIBLE_DEVICES expose, else the ones nvidia-smi lists.
visible_gpus() {
    local ids
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    else
        (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true
    fi
}

# Format and optimizer presets and the newest complete checkpoint of a run: scripts/presets.py, the one table
# shared with scripts/sweep.py and scripts/mini_paper.sh (standard library Python only). A refusal is its one line.
presets() { "${PYTHON3:-python3}" "$repo/scripts/presets.py" "$@"; }

dry_run="${DRY_RUN:-0}"
passthrough=()
for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then dry_run=1; else passthrough+=("$arg"); fi
done
if [[ ${#passthrough[@]} -eq 0 ]]; then die "missing the cell id, e.g. t1-int4-350m-stablespam (see --list)"; fi
if [[ ${passthrough[0]} == --list ]]; then list_cells; exit 0; fi
cell="${passthrough[0]}"
passthrough=(${passthrough[@]+"${passthrough[@]:1}"})
check_passthrough ${passthrough[@]+"${passthrough[@]}"}

row="$(grep -v '^#' "$manifest" | awk -F'\t' -v id="$cell" '$1 == id')"
[[ -n $row ]] || die "unknown cell '$cell'; list the cells with: scripts/paper/launch.sh --list"
IFS=$'\t' read -r _ paper_lr paper_steps paper_warmup paper_ppl tokens <<<"$row"
IFS=- read -r table format size optimizer <<<"$cell"

lr="${LR:-$paper_lr}"
steps="${STEPS:-$paper_steps}"
seed="${SEED:-0}"
save_every="${SAVE_EVERY:-1000}"
[[ $seed =~ ^[0-9]+$ ]] || die "SEED=$seed: must be a non-negative integer"
[[ $steps =~ ^[1-9][0-9]*$ ]] || die "STEPS=$steps: must be a positive integer"
[[ $save_every =~ ^[1-9][0-9]*$ ]] || die "SAVE_EVERY=$save_every: must be a positive integer"
# The paper's warm-up, shortened with a shorter run so that it still ends well before the last update.
if [[ -n ${WARMUP:-} ]]; then
    warmup="$WARMUP"
    [[ $warmup =~ ^[0-9]+$ ]] || die "WARMUP=$warmup: must be a non-negative integer"
elif [[ $steps != "$paper_steps" ]]; then
    warmup=$((steps / 10 < paper_warmup ? steps / 10 : paper_warmup))
else
    warmup="$paper_warmup"
fi
((10#$warmup < 10#$steps)) || die "warm-up $warmup is not below the $steps updates; set WARMUP below STEPS"
if [[ -n ${RESET:-} ]]; then
    [[ $RESET =~ ^[1-9][0-9]*$ ]] || die "RESET=$RESET: must be a positive integer"
fi

# --- precision: what the reference code effectively ran (docs/algorithms.md#c1) ---
# INT4 = W4A4 integer simulation with group 256 for weights and activations, round-to-nearest: the published
# script's --act_group_size 64 --act_stochastic were dead flags there, so they are not passed here.
precision_line="$(presets format "$format")" || exit 2
read -r -a precision_flags <<<"$precision_line"

# --- optimizer ---
# SPAM: density 1.0, reset every 500 updates; threshold and post-reset warm-up as the code behind each table
# ran them. Table 1's SPAM ran in the StableSPAM repo, whose SPAM has no flag for either and used its
# constructor defaults, threshold 2000 and warm-up 150 (docs/algorithms.md#b1). Table 2's SPAM numbers are the SPAM
# paper's: threshold 5000, and its code passed the lr warm-up as the post-reset warm-up (docs/algorithms.md#b6).
# StableSPAM, Tables 6/7: gammas per precision, momentum reset every 1000 updates, total_T = the update count.
# Table 6 says 1000; the only published 4-bit commands use 500 (RESET=500 runs those).
if [[ $table == t2 ]]; then spam_code=spam_repo; else spam_code=stablespam_repo; fi
optimizer_line="$(presets optimizer "$optimizer" --format "$format" --steps "$steps" --spam-code "$spam_code" \
                  --lr-warmup "$warmup" ${RESET:+--reset "$RESET"})" || exit 2
read -r -a optimizer_flags <<<"$optimizer_line"

# --- processes and batch ---
if [[ -z ${NGPU:-} ]]; then
    NGPU="$(visible_gpus)"
    [[ $NGPU -gt 0 ]] || NGPU=1
fi
nnodes="${NNODES:-1}"
[[ $NGPU =~ ^[1-9][0-9]*$ ]] || die "NGPU=$NGPU: must be a positive integer"
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "NNODES=$nnodes: must be a positive integer"
world=$((NGPU * nnodes))
((TOTAL_BATCH % world == 0)) || die "NGPU x NNODES = $world does not divide the total batch of $TOTAL_BATCH"
per_gpu=$((TOTAL_BATCH / world))
# The reference ran 128 sequences per 80 GB GPU up to 350M; 1B gets 64 (a guess: no 1B script fits 4 GPUs).
case "$size" in 1b) default_micro=64 ;; *) default_micro=128 ;; esac
micro="${BATCH_SIZE:-$((per_gpu < default_micro ? per_gpu : default_micro))}"
[[ $micro =~ ^[1-9][0-9]*$ ]] || die "BATCH_SIZE=$micro: must be a positive integer"
((per_gpu % micro == 0)) ||
    die "BATCH_SIZE=$micro does not divide the $per_gpu sequences per GPU ($TOTAL_BATCH / $world)"
accumulation=$((per_gpu / micro))

if ((nnodes == 1)); then
    launcher=(torchrun --standalone --nnodes 1 --nproc_per_node "$NGPU")
else
    [[ -n ${RDZV_ENDPOINT:-} ]] || die "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (a node every node can reach)"
fi

# --- names: derived from the settings, never typed ---
run_name="$cell-lr$lr-s$seed"
[[ $steps == "$paper_steps" ]] || run_name="$run_name-n$steps"
[[ -z ${WARMUP:-} ]] || run_name="$run_name-w$warmup"
[[ -z ${RESET:-} ]] || run_name="$run_name-r$RESET"
run_name="$run_name$(passthrough_tags ${passthrough[@]+"${passthrough[@]}"})"
save_dir="${RUNS_DIR:-runs/paper}/$run_name"
if ((nnodes > 1)); then
    launcher=(torchrun --nnodes "$nnodes" --nproc_per_node "$NGPU" --rdzv_backend c10d
              --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-$run_name}")
fi

# --- resume: continue from the newest complete checkpoint of this run, unless FRESH=1 ---
checkpoint="$(presets newest-checkpoint "$save_dir")" || exit 2
resume_flags=()
if [[ ${FRESH:-0} == 1 ]]; then
    [[ -z $checkpoint ]] || die "FRESH=1 but $save_dir holds checkpoint model_$checkpoint; move or delete it first"
    start="fresh start (FRESH=1)"
elif [[ -n $checkpoint ]]; then
    resume_flags=(--continue_from "$save_dir" --restore_optimizer)
    start="resumes from $save_dir/model_$checkpoint"
else
    start="fresh start"
fi

command=("${launcher[@]}" "$repo/main_pretrain.py"
    --model_config "$repo/configs/llama_$size.json"
    --dtype bfloat16 --max_length "$MAX_LENGTH" --batch_size "$micro" --total_batch_size "$TOTAL_BATCH"
    --lr "$lr" --warmup_steps "$warmup" --num_training_steps "$steps" --scheduler cosine --min_lr_ratio 0.1
    --weight_decay 0 --eval_every 1000 --save_every "$save_every" --keep_last 2 --seed "$seed"
    ${precision_flags[@]+"${precision_flags[@]}"} "${optimizer_flags[@]}"
    --project stablespam-paper --name "$run_name" --save_dir "$save_dir"
    ${resume_flags[@]+"${resume_flags[@]}"} ${passthrough[@]+"${passthrough[@]}"})

echo "# $run_name: $table $format $size $optimizer, lr $lr, $steps updates (warm-up $warmup) x $TOTAL_BATCH x" \
     "$MAX_LENGTH tokens (paper: $tokens), $nnodes node(s) x $NGPU GPU(s) x micro-batch $micro x accumulation" \
     "$accumulation, paper ppl $paper_ppl, save_dir $save_dir, $start"
printf '%q ' "${command[@]}"
echo
if [[ $dry_run == 1 ]]; then exit 0; fi
exec "${command[@]}"
