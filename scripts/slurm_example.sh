#!/usr/bin/env bash
# LLaMA-1B with StableSPAM under FSDP2 on several nodes: one srun task per node, each starting torchrun for
# that node's GPUs; torchrun's c10d rendezvous on the first node joins them (nothing home-made).
#
# Requeue-safe: every run writes checkpoints to SAVE_DIR and, when it finds one there, resumes from the newest
# with its optimizer state, data position and RNG states (--continue_from SAVE_DIR --restore_optimizer). So
# `scontrol requeue`, preemption or a resubmission continue where the last checkpoint left off.
#
#   sbatch scripts/slurm_example.sh                          # 2 nodes x 8 GPUs
#   sbatch --nodes 4 scripts/slurm_example.sh                # a new run (SAVE_DIR without checkpoints) on 4 nodes;
#                                                            # the batch per update stays TOTAL_BATCH. A resume
#                                                            # needs the node count of the run that saved.
#   SAVE_DIR=/path/run1 sbatch scripts/slurm_example.sh --eval_every 500   # extra flags pass through
#
# Partition, account, modules and environments are site-specific: add them with sbatch options or in your
# shell before submitting (this file names none). Secrets (WANDB_API_KEY) come from the environment.
#SBATCH --job-name=stablespam-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

ROOT=${ROOT:-$(pwd)}  # sbatch runs a copy of this file: submit from the repository root or set ROOT
GPUS=${GPUS:-8}
SAVE_DIR=${SAVE_DIR:-$ROOT/checkpoints/llama_1b-stablespam-fsdp}
TOTAL_BATCH=${TOTAL_BATCH:-512}
MICRO_BATCH=${MICRO_BATCH:-32}
PORT=${PORT:-29500}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

resume=()
if compgen -G "$SAVE_DIR/model_*" > /dev/null; then
    resume=(--continue_from "$SAVE_DIR" --restore_optimizer)
fi

# 5 minutes before the time limit SLURM sends USR1 (--signal above): put the job back in the queue. The next
# allocation resumes from the newest complete checkpoint (a half-written one is never picked).
trap 'scontrol requeue "$SLURM_JOB_ID"' USR1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:$PORT" \
    "$ROOT/main_pretrain.py" \
    --model_config "$ROOT/configs/llama_1b.json" \
    --fsdp --fsdp_param_dtype bfloat16 --dtype float32 \
    --optimizer stablespam --lr 2e-4 --gamma1 0.85 --gamma2 0.99999 --gamma3 0.999 --update_proj_gap 1000 \
    --total_T 20000 --num_training_steps 20000 --warmup_steps 2000 \
    --batch_size "$MICRO_BATCH" --total_batch_size "$TOTAL_BATCH" --max_length 256 \
    --eval_every 1000 --save_every 1000 --keep_last 3 \
    --save_dir "$SAVE_DIR" --name "$SLURM_JOB_NAME" \
    ${resume[@]+"${resume[@]}"} "$@" &
wait
