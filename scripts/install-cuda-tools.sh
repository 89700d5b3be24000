#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels (nvcc, ptxas, NVRTC, headers) into the
# ignored tools/cuda folder. No GPU or driver is needed: build.rs picks up
# tools/cuda/nvidia/cu13/bin/nvcc to embed cubins/PTX, and scripts/check-kernels.sh uses
# nvcc and libnvrtc from here.
#
# One `pip install --target` call for all wheels: separate installs into one target do
# not merge (the second replaces the shared nvidia/ folder). About 190 MB to download.
# Idempotent: does nothing when the pinned set is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=tools/cuda
PINS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88"
STAMP="$DIR/.installed"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PINS" && -x "$DIR/nvidia/cu13/bin/nvcc" ]]; then
    echo "CUDA tools already installed in $DIR"
    exit 0
fi
rm -rf "$DIR"
mkdir -p "$DIR"
# shellcheck disable=SC2086
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$DIR" $PINS
echo "$PINS" > "$STAMP"
# build.rs looks for nvcc when it runs: make the next cargo build embed the fatbins
touch build.rs
echo "CUDA tools installed in $DIR: $("$DIR/nvidia/cu13/bin/nvcc" --version | tail -n 2 | head -n 1)"
