#!/usr/bin/env bash
# benchmarks/gpu_check.py on a GPU machine whose python3 has CUDA torch but not this project
# (nor, maybe, its other dependencies or a package index), from the repository root:
#
#   WHEELS=.whl OUT=results benchmarks/gpu_run.sh [gpu_check.py arguments]
#
# WHEELS (default .whl, made by benchmarks/gpu_wheels.py): installed into a private folder
# first when present, so the machine's own packages stay as they are. The fused CPU ops are
# off (a GPU run has no use for them and building them costs a minute). Speed is measured on
# random-weight twins unless the arguments give --model and --corpus.
set -euo pipefail
wheels=${WHEELS:-.whl}
out=${OUT:-results}
site=$(mktemp -d)
path=$PWD/src:$PWD
if [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$wheels"/*.whl
  path=$site:$path
fi
export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH}
export READMOE_CPU_OPS=0 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--twins --speed-timeout 190 --speed-args --repeats 3)
fi
exec python3 benchmarks/gpu_check.py --results "$out" "${args[@]}"
