#!/bin/bash
# ------------------------------------------------------------------------------------------------
# mpt-jax on a Cloud TPU VM slice (v4-32, v5p-128, v5litepod-64, ...): the same command on every
# worker (host) of the slice, through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_vm.sh setup          # once: copy this checkout to every worker and install it
#   launch/tpu_vm.sh train          # start (or resume) training on all workers
#   launch/tpu_vm.sh stop           # SIGTERM on all workers: the trainer checkpoints and exits
#   CONFIG=configs/30b.py WORKDIR=/mnt/shared/30b launch/tpu_vm.sh train
#
# What to edit (or set in the environment):
#   TPU_NAME, ZONE, PROJECT     the slice (created with `gcloud compute tpus tpu-vm create`)
#   CONFIG, WORKDIR, EXTRA      the run; WORKDIR must be one directory that every worker sees
#                               (a Filestore/NFS mount or a gcsfuse-mounted bucket): each process
#                               writes its part of every checkpoint there, and the run resumes from it
#   REMOTE_DIR                  where the checkout lives on the workers
#   the `setup` commands        if the workers need a different Python or a proxy
#
# How it starts: on TPU, jax.distributed needs no coordinator address or process ids: JAX learns
# the slice's hosts and each worker's index from the TPU VM metadata. The script exports the
# workers' addresses as TPU_WORKER_HOSTNAMES, which tells the trainer it is one of several hosts.
# The mesh spans every chip of the slice. The training processes run under nohup on the workers
# (closing this terminal does not stop them); each worker's output goes to $REMOTE_DIR/train.log,
# its process id to train.pid.
#
# Check the memory first (v5p: 95 GiB per chip, v4: 32, v5e: 16):
#   python -m mpt_jax.plan --config=$CONFIG --devices=<chips> --device_memory_gb=95 --platform=tpu
# ------------------------------------------------------------------------------------------------
set -euo pipefail

TPU_NAME=${TPU_NAME:-mpt-jax}
ZONE=${ZONE:-us-east5-a}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
CONFIG=${CONFIG:-configs/7b.py}
WORKDIR=${WORKDIR:-/mnt/shared/workdirs/$(basename "$CONFIG" .py)}
EXTRA=${EXTRA:-}
REMOTE_DIR=${REMOTE_DIR:-mpt-jax}

on_all_workers() {
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}

case "${1:-train}" in
    setup)
        here=$(cd "$(dirname "$0")/.." && pwd)
        gcloud compute tpus tpu-vm scp --zone="$ZONE" --project="$PROJECT" --worker=all --recurse \
            "$here" "$TPU_NAME:$REMOTE_DIR"
        on_all_workers "cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && \
            pip install -q -U pip && pip install -q -e '.[tpu]'"
        ;;
    train)
        # The workers' addresses, so the trainer (mpt_jax/distributed.py) sees a multi-host slice and
        # calls jax.distributed.initialize(), which reads the rest from the TPU metadata.
        hosts=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
            --format='value(networkEndpoints[].ipAddress)' | tr ';' ',')
        on_all_workers "export TPU_WORKER_HOSTNAMES=$hosts && cd $REMOTE_DIR && . .venv/bin/activate && { \
            nohup python -m mpt_jax.train --config=$CONFIG --workdir=$WORKDIR $EXTRA > train.log 2>&1 & \
            echo \$! > train.pid; }"
        echo "started on every worker of $TPU_NAME; follow worker 0 with:"
        echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --project=$PROJECT --worker=0 --command='tail -f $REMOTE_DIR/train.log'"
        ;;
    stop)
        on_all_workers "cd $REMOTE_DIR && if [ -f train.pid ]; then kill -TERM \$(cat train.pid) || true; fi"
        ;;
    *)
        echo "usage: $0 [setup|train|stop]" >&2
        exit 2
        ;;
esac
