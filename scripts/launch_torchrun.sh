#!/usr/bin/env bash
# Train with DDP on one or several nodes through torchrun: one process per GPU, Lightning reads the
# ranks torchrun sets (LOCAL_RANK, RANK, WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT).
#
#   scripts/launch_torchrun.sh CONFIG [more lightning-resode fit arguments...]
#
# Run it once per node, with the same CONFIG, NNODES, MASTER_ADDR and MASTER_PORT everywhere and
# NODE_RANK = 0 … NNODES-1. Settings (environment, defaults in brackets):
#   NPROC_PER_NODE  processes = GPUs used on this node   [all GPUs torch sees, at least 1]
#   NNODES          number of nodes                       [1]
#   NODE_RANK       this node's index                     [0]
#   MASTER_ADDR     address of node 0, reachable by all   [127.0.0.1]
#   MASTER_PORT     a free TCP port on node 0             [29500]
#   DRY_RUN=1       print the command instead of running it
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 CONFIG [more lightning-resode fit arguments...]" >&2
    exit 2
fi
config=$1
shift
if [[ -z "${DRY_RUN:-}" && ! -f "$config" ]]; then
    echo "$0: config file '$config' not found" >&2
    exit 2
fi

nproc_per_node=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}

command=(
    torchrun
    --nnodes="$nnodes"
    --nproc-per-node="$nproc_per_node"
    --node-rank="$node_rank"
    --master-addr="$master_addr"
    --master-port="$master_port"
    --no-python
    lightning-resode fit
    --config "$config"
    --trainer.strategy=ddp
    --trainer.devices="$nproc_per_node"
    --trainer.num_nodes="$nnodes"
    "$@"
)

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%s\n' "${command[*]}"
else
    exec "${command[@]}"
fi
