#!/usr/bin/env bash
# Train with torchtitan + titan_mla:  ./run_train.sh [--job.config_file train_configs/X.toml] [overrides]
# NGPU (default: every visible GPU, or 1 CPU rank without one), LOG_RANK (default 0) and
# TORCHRUN_ARGS (e.g. multi-node rendezvous flags) come from the environment.
set -euo pipefail
cd "$(dirname "$0")" >/dev/null && repo=$PWD && cd - >/dev/null

if [[ " $* " != *" --job.config_file"* ]]; then
  set -- --job.config_file "$repo/train_configs/debug_model.toml" "$@"
fi
for ((i = 1; i <= $#; i++)); do
  arg=${!i}; file=""
  if [[ $arg == --job.config_file=* ]]; then file=${arg#*=}; elif [[ $arg == --job.config_file ]]; then j=$((i + 1)); file=${!j:-}; fi
  if [[ -n $arg && $arg == --job.config_file* && ! -f $file ]]; then
    echo "run_train.sh: error: config file '$file' does not exist (configs: $repo/train_configs/*.toml)" >&2
    exit 2
  fi
done
if [[ -z "${NGPU:-}" ]]; then
  NGPU=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
LOG_RANK=${LOG_RANK:-0}
read -r -a torchrun_args <<<"${TORCHRUN_ARGS:-}"  # e.g. "--nnodes 2 --rdzv_endpoint head:29500", split on spaces

PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True} \
exec python3 -m torch.distributed.run --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 "${torchrun_args[@]}" \
  -m titan_mla.train "$@"
