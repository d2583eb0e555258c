#!/usr/bin/env bash
# Installs the CPU peers of bench/cpu_peers.py: PyTorch (pinned) in a virtual environment outside
# the clone, idempotently; prints the environment's python. PyPI's Linux wheel brings its CUDA
# libraries too (~5 GB in all): torch does not import without them, although the CPU runs use none.
#   SEGATTN_PEERS_VENV  where (default: ${SEGATTN_CACHE:-$HOME/.cache/segattn}/peers-venv)
set -euo pipefail
TORCH_VERSION=2.15.0
VENV="${SEGATTN_PEERS_VENV:-${SEGATTN_CACHE:-$HOME/.cache/segattn}/peers-venv}"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "install-cpu-peers: torch $TORCH_VERSION into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip >&2
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" numpy >&2
fi
echo "$VENV/bin/python"
