# Shared by tools/{dist,slurm}_{train,test}.sh (sourced, not run).
#
#   torchrun_launch SCRIPT NPROC ARGS...
#       torchrun over NPROC local processes; NNODES, NODE_RANK, MASTER_ADDR
#       and PORT (the same on every node) for several nodes.
#   slurm_launch PARTITION JOB_NAME SCRIPT ARGS...
#       srun with GPUS tasks, GPUS_PER_NODE per node, CPUS_PER_TASK cores
#       each and extra SRUN_ARGS.
#
# SCRIPT is tools/train.py or tools/test.py; the Python is $PYTHON, else the
# project's .venv when it exists, else python3.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

torchrun_launch() {
    local script=$1 nproc=$2
    shift 2
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --master_port="${PORT:-29500}" \
        --nproc_per_node="$nproc" \
        "$ROOT/tools/$script" --launcher pytorch "$@"
}

slurm_launch() {
    local partition=$1 job_name=$2 script=$3
    shift 3
    local gpus=${GPUS:-8}
    local per_node=${GPUS_PER_NODE:-$(( gpus < 8 ? gpus : 8 ))}
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of options
    exec srun -p "$partition" \
        --job-name="$job_name" \
        --gres=gpu:"$per_node" \
        --ntasks="$gpus" \
        --ntasks-per-node="$per_node" \
        --cpus-per-task="${CPUS_PER_TASK:-5}" \
        --kill-on-bad-exit=1 \
        ${SRUN_ARGS:-} \
        "$PYTHON" -u "$ROOT/tools/$script" --launcher=slurm "$@"
}
