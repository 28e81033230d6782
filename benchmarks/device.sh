#!/usr/bin/env bash
# The Fashion-MNIST benchmarks on a CUDA machine, in one go (for the `device` tool, which copies this repository
# there and brings back what the command writes under $OUT).
#
# That machine has no network and no Debian dataset package. Prepare, here, once:
#   mkdir -p .bench/idx .bench/wheels && echo /.bench/ >> .git/info/exclude
#   cp /usr/share/datasets/fashion-mnist/*.gz .bench/idx/
#   pip download -d .bench/wheels --only-binary=:all: timm typer rich pydantic pyyaml safetensors scikit-learn \
#       matplotlib huggingface-hub filelock       # only what the machine's image lacks (see the device notes)
# then run with carry [".bench"]:  bash benchmarks/device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/bench-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
if [ -d .bench/wheels ]; then
    python3 -m pip install -q --no-index --find-links .bench/wheels timm typer rich pydantic pyyaml safetensors \
        scikit-learn matplotlib huggingface-hub filelock 2>&1 | tail -3 || true
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
export PYTHONUNBUFFERED=1 IMGCLF_FASHION_IDX="${IMGCLF_FASHION_IDX:-$PWD/.bench/idx}"
python3 benchmarks/fashion_mnist.py all --data "$out/fashion-mnist" --json "$out/fashion_mnist_cuda.json" \
    2>&1 | tee "$out/benchmark.log"
