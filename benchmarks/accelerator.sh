#!/usr/bin/env bash
# The accelerator check (issue 15): bf16 parity vs HF and the attention benchmarks at LLaVA-1.5-7B shape.
# Usage: bash benchmarks/accelerator.sh [OUT_DIR] [--tiny] [more benchmarks/accelerator.py options]
# Writes OUT_DIR/accelerator.{json,md} (default OUT_DIR: benchmarks). Needs jax with the GPU (or TPU) plugin and
# torch with CUDA; under 8 minutes on one H100/H200-class GPU; stops itself after ACCELERATOR_TIMEOUT seconds (450).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks}"
[ $# -gt 0 ] && shift
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax, torch; print('jax', jax.__version__, jax.default_backend(), jax.devices()); \
print('torch', torch.__version__, 'cuda:', torch.cuda.is_available())"
timeout "${ACCELERATOR_TIMEOUT:-450}" python benchmarks/accelerator.py --out-dir "$OUT" "$@"
