#!/usr/bin/env bash
# Carry gpu_check.py to a GPU machine that reaches no package registry and no model hub.
#
#   benchmarks/gpu_bundle.sh prepare [DIR]   # here, with pip access: wheels and model shapes into DIR (default .gpu-bundle)
#   benchmarks/gpu_bundle.sh run [DIR] [gpu_check flags...]   # there, from the repository's root
#
# prepare downloads (Python 3.12, x86-64 Linux) the wheels sd and the peer need beyond an image that
# already has torch, CUDA, accelerate, pandas, pyarrow, typer and rich: transformers, peft,
# bitsandbytes (its CUDA 13 libraries only: 13 MB instead of 43), gguf, pydantic, trl and datasets.
# It also writes the built-in model's shapes and a 0.5B model's (configs and tokenizer, no weights;
# gpu_check.py --write-shapes): the built-in weights (98 MB) rarely fit what can be carried.
# run installs the wheels into /tmp/gpu-bundle-site, then runs gpu_check.py on both shapes with
# random weights, writing gpu.json and gpu.log into $OUT (or the current folder).
# PYTHON_VERSION and CUDA_LIBS change what prepare fetches (default 3.12 and cuda13).
set -euo pipefail
verb=${1:?usage: gpu_bundle.sh prepare|run [DIR] [gpu_check flags...]}
dir=${2:-.gpu-bundle}
shift $(( $# >= 2 ? 2 : 1 ))
here=$(cd "$(dirname "$0")" && pwd)

case $verb in
prepare)
  mkdir -p "$dir/wheels"
  platforms=()
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$dir/wheels" \
    transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 gguf==0.19.0 \
    pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  # bitsandbytes ships one library per CUDA version: keep the CPU one and those of CUDA_LIBS
  python3 - "$dir/wheels" "${CUDA_LIBS:-cuda13}" <<'PY'
import sys, zipfile
from pathlib import Path
folder, keep = Path(sys.argv[1]), sys.argv[2]
for wheel in folder.glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    dropped = lambda n: n.endswith(".so") and "libbitsandbytes_" in n and "_cpu" not in n and f"_{keep}" not in n
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(True) if not dropped(l.split(b",")[0].decode()))
            dst.writestr(item, data)
    slim.replace(wheel)
PY
  python3 "$here/gpu_check.py" --write-shapes "$dir/shapes"
  du -sh "$dir"
  ;;
run)
  out=${OUT:-.}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-bundle-site "$dir"/wheels/*.whl
  export PYTHONPATH=/tmp/gpu-bundle-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  export SD_CACHE=${SD_CACHE:-/tmp/sd-cache}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 "$here/gpu_check.py" --random-weights "$dir/shapes/smollm2-135m-instruct" \
    --random-weights "$dir/shapes/qwen2.5-0.5b-shapes" --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
  ;;
*)
  echo "usage: gpu_bundle.sh prepare|run [DIR] [gpu_check flags...]" >&2
  exit 2
  ;;
esac
