#!/usr/bin/env bash
# One box, no Ray: three stage workers and the gateway, each its own process (Ctrl-C stops all).
#   deploy/standalone.sh [MODEL_DIR]      (no MODEL_DIR: the embedded tiny model)
# On a GPU box, pin each worker to a GPU with CUDA_VISIBLE_DEVICES=N before its command.
set -euo pipefail
model=(); [ $# -ge 1 ] && model=(--model-path "$1")
here=$(cd "$(dirname "$0")" && pwd)
trap 'kill 0' EXIT
ditserve worker --role encoder  "${model[@]}" --grpc-port 50051 &
ditserve worker --role denoiser "${model[@]}" --grpc-port 50052 &
ditserve worker --role vae      "${model[@]}" --grpc-port 50053 &
ditserve serve --config "$here/standalone.yaml" "${model[@]}"
