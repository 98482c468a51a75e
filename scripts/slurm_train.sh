#!/usr/bin/env bash
# Multi-node KOALA distillation under SLURM: one `accelerate launch` per node, rendezvous on the first node.
#
#   RUN_DIR=/shared/runs/koala_lightning_1b sbatch --nodes=4 --gres=gpu:8 --signal=B:USR1@300 --requeue \
#       scripts/slurm_train.sh +experiment=koala_lightning_1b teacher.path=... teacher.unet_file=... \
#       data.shards=... data.resampled=true
#
# --signal=B:USR1@300 makes SLURM signal this script five minutes before the time limit. The script then creates
# $RUN_DIR/STOP, which every rank sees: each finishes its step, a checkpoint is written, and the job exits 0; with
# --requeue it comes back and continues from the latest checkpoint (train.resume=latest is always passed).
# RUN_DIR must be on a file system shared by all nodes.
#SBATCH --job-name=koala-distill
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

: "${RUN_DIR:?set RUN_DIR to the run directory on a shared file system}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
CONFIG=${ACCELERATE_CONFIG:-conf/accelerate/multi_node.yaml}
PYTHON_ENV=${PYTHON_ENV:-.venv}
mkdir -p "$RUN_DIR"
# Check the config once, here, with the job's process count: a bad one is one line, not a line per node followed
# by each launcher's traceback.
WORLD_SIZE=$NUM_PROCESSES "$PYTHON_ENV/bin/python" train/main.py --check train.output_dir="$RUN_DIR" \
  train.resume=latest "$@" || exit 2

# The overrides, quoted for the inner shell exactly as this script received them (spaces, quotes, braces).
OVERRIDES=$(if (($#)); then printf '%q ' "$@"; fi)  # none: nothing (printf alone gives '')
srun --kill-on-bad-exit=1 bash -c "
  source '$PYTHON_ENV/bin/activate'
  exec accelerate launch --config_file '$CONFIG' \
    --num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES --machine_rank \$SLURM_PROCID \
    --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    train/main.py train.output_dir='$RUN_DIR' train.resume=latest $OVERRIDES
" &
SRUN_PID=$!
trap 'echo "stop requested by the scheduler: creating $RUN_DIR/STOP"; touch "$RUN_DIR/STOP"' USR1 TERM
# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has ended.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" && status=0 || status=$?; done
wait "$SRUN_PID" 2>/dev/null && status=0 || status=${status:-$?}
exit "$status"
