#!/usr/bin/env bash
# Compile checks of every CUDA kernel, with no GPU needed:
# 1. nvcc (pinned CUDA 13.0 wheels, installed by install-cuda-tools.sh) compiles each
#    kernels/*.cu to a cubin for sm_80 and sm_90 with `-Xptxas -v`; any error, or any
#    kernel with a register spill or a stack frame (local memory: e.g. a struct argument
#    indexed dynamically), fails the check;
# 2. every kernel's embedded source (as the runtime hands it to NVRTC) compiles through
#    libnvrtc.so.13 for sm_80 and sm_90 (the `nvrtc_compiles_every_kernel` test).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-cuda-tools.sh
CUDA=tools/cuda/nvidia/cu13
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failed=0
kernels=0
for cu in kernels/*.cu; do
    for arch in 80 90; do
        log="$tmp/$(basename "$cu" .cu)_sm$arch.log"
        if ! "$CUDA/bin/nvcc" -cubin -O3 -arch="sm_$arch" -Ikernels -Xptxas -v -o "$tmp/out.cubin" "$cu" >"$log" 2>&1; then
            cat "$log"
            echo "FAIL: nvcc $cu for sm_$arch"
            failed=1
            continue
        fi
        # ptxas prints, per kernel, "N bytes stack frame, S bytes spill stores, L bytes spill loads"
        if grep -E '[1-9][0-9]* bytes (spill stores|spill loads|stack frame)' "$log" >/dev/null; then
            grep -B2 -E '[1-9][0-9]* bytes (spill stores|spill loads|stack frame)' "$log"
            echo "FAIL: register spills or local memory in $cu for sm_$arch"
            failed=1
        fi
        n=$(grep -c "Compiling entry function" "$log" || true)
        regs=$(grep -oE 'Used [0-9]+ registers' "$log" | awk '{print $2}' | sort -n | tail -1)
        echo "nvcc sm_$arch $cu: $n kernels, no spills, no local memory, at most $regs registers"
        kernels=$((kernels + n))
    done
done
[[ $failed == 0 ]] || { echo "kernel compile check FAILED"; exit 1; }
echo "nvcc: $kernels kernel compilations (sm_80 + sm_90), no errors, no spills, no local memory"

# NVRTC, as the runtime uses it; the test fails rather than skips when this is set.
LD_LIBRARY_PATH="$PWD/$CUDA/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" DFKD_REQUIRE_NVRTC=1 \
    cargo test --release --test cuda_parity nvrtc_compiles_every_kernel -- --nocapture 2>&1 | grep -vE '^\s+(Compiling|Running)'
echo "kernel compile check passed"
