# Shared by the sbatch examples: cluster settings, the launch (srun one task per GPU, or torchrun
# per node), and what happens at the time limit and at preemption.  Source it after setting
#   RUN_DIR       the run's own checkpoint directory (--load = --save: a requeued job resumes)
#   TRAIN_ITERS   the run's --train-iters (decides whether to requeue at the time limit)
#   TRAIN_ARGS    (array) the model, data and RLP flags
# Optional: LAUNCHER=srun|torchrun (default srun), GPUS_PER_NODE (default 8).
#
# Time limit: `#SBATCH --signal=B:USR1@300` warns the batch shell (only it: the `B:`), whose trap
# forwards USR1 to srun, which forwards it to its tasks; every rank saves at the end of its
# iteration and exits 0; the trap then requeues the job unless the run has finished.
# Preemption: slurm sends SIGTERM to every process of the job; the ranks save and exit, and
# `#SBATCH --requeue` puts the job back in the queue.  A restarted job resumes from $RUN_DIR.

LAUNCHER=${LAUNCHER:-srun}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

export CUDA_DEVICE_MAX_CONNECTIONS=1          # ordered TP/SP communication and compute overlap
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a failed collective ends the job instead of hanging it
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
# sed, not head: head closes the pipe early and scontrol's SIGPIPE would fail the script under pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}

RUN_ARGS=(
    --load "$RUN_DIR" --save "$RUN_DIR" --exit-signal-handler
    --train-iters "$TRAIN_ITERS"
    "${TRAIN_ARGS[@]}"
)

finished() {
    local latest
    latest=$(cat "$RUN_DIR/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
    [ "$latest" -ge "$TRAIN_ITERS" ]
}

on_time_limit() {
    echo "$(date) time-limit warning: asking every rank to save and exit"
    kill -USR1 "$STEP_PID" 2>/dev/null || true
    wait "$STEP_PID" || true
    if finished; then
        echo "$(date) the run finished; not requeueing"
    else
        echo "$(date) requeueing job $SLURM_JOB_ID; it resumes from $RUN_DIR"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
}

on_preemption() {
    echo "$(date) preempted: waiting for the ranks to save (slurm requeues the job)"
    kill -TERM "$STEP_PID" 2>/dev/null || true
    wait "$STEP_PID" || true
    exit 0
}

trap on_time_limit USR1
trap on_preemption TERM

mkdir -p logs
if [ "$LAUNCHER" = srun ]; then
    # One task per GPU: the ranks read SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID.
    srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" \
        python -m megatron_rlp.pretrain "${RUN_ARGS[@]}" &
elif [ "$LAUNCHER" = torchrun ]; then
    # One torchrun per node.  torchrun dies on a signal it does not handle (and orphans its
    # workers), so it is told to forward USR1, and given time to let the workers save.
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
        torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 900 \
        -m megatron_rlp.pretrain "${RUN_ARGS[@]}" &
else
    echo "LAUNCHER must be srun or torchrun, got '$LAUNCHER'" >&2
    exit 2
fi
STEP_PID=$!
# `wait` returns early when a trapped signal arrives; the trap then takes over.
wait "$STEP_PID"
