#!/usr/bin/env bash
# Build the ISOLATED virtual environments that hold the peer tools mechscope is benchmarked against.
# The peers never touch the project's own environment.
#
#   bash benchmarks/peer_venv.sh            # both venvs
#   bash benchmarks/peer_venv.sh peers      # only benchmarks/.venv-peers
#   bash benchmarks/peer_venv.sh ct         # only benchmarks/.venv-circuit-tracer
#   FORCE=1 bash benchmarks/peer_venv.sh    # reinstall even if the stamp says it is up to date
#
# benchmarks/.venv-peers           torch==2.13.0 (CPU) + transformers==5.24.0 transformer-lens==3.9.0
#                                  nnsight==0.8.1 sae-lens==6.54.12 eai-sparsify==1.3.3
# benchmarks/.venv-circuit-tracer  torch==2.13.0 (CPU) + circuit-tracer==0.5.* (pins transformers<=4.57.3)
#
# torch is installed FIRST and every later install runs with a constraints file holding
# `torch==2.13.0`: on these machines that resolves to the local CPU wheel, whereas an unconstrained
# `torch` requirement from a peer would pull a multi-GB CUDA build.
# Pins: all of the above resolved as written; none had to change.
#
# Idempotent: an existing venv is reused, and a venv whose stamp file matches its requirement list
# and whose packages import is left alone. Installs take several minutes; run it in the background
# if your shell has a time limit:  bash benchmarks/peer_venv.sh > /tmp/peer_venv.log 2>&1 &
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"

# build_venv NAME IMPORT_CHECK REQUIREMENT...
build_venv() {
  local venv="$HERE/$1" check="$2"
  shift 2
  local reqs="$TORCH_PIN $*"
  local stamp="$venv/.mechscope-stamp"
  if [[ -z "${FORCE:-}" && -f "$stamp" && "$(cat "$stamp")" == "$reqs" ]] \
     && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "== $venv is up to date ($reqs)"
    return 0
  fi
  echo "== building $venv: $reqs"
  local t0=$SECONDS
  [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
  echo "$TORCH_PIN" > "$venv/constraints.txt"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first, alone, so the CPU wheel is the one in place ...
  "$venv/bin/python" -m pip install "$TORCH_PIN"
  # ... and every later install is held to it.
  "$venv/bin/python" -m pip install -c "$venv/constraints.txt" "$@"
  "$venv/bin/python" -c "$check"
  echo "$reqs" > "$stamp"
  echo "== $venv built in $((SECONDS - t0)) s, $(du -sh "$venv" | cut -f1) on disk"
}

show() {
  local venv="$HERE/$1"
  shift
  echo "== installed in $venv:"
  "$venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i -E "^($(IFS='|'; echo "$*"))==" || true
  echo "   size: $(du -sh "$venv" | cut -f1)"
}

what="${1:-all}"
if [[ "$what" == all || "$what" == peers ]]; then
  build_venv .venv-peers "import torch, transformers, transformer_lens, nnsight, sae_lens, sparsify" \
    transformers==5.24.0 transformer-lens==3.9.0 nnsight==0.8.1 sae-lens==6.54.12 eai-sparsify==1.3.3 psutil
  show .venv-peers torch transformers transformer-lens nnsight sae-lens eai-sparsify psutil
fi
if [[ "$what" == all || "$what" == ct ]]; then
  build_venv .venv-circuit-tracer "import torch, transformers, circuit_tracer" "circuit-tracer==0.5.*" psutil
  show .venv-circuit-tracer torch transformers circuit-tracer transformer-lens nnsight psutil
fi
