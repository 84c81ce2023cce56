#!/usr/bin/env bash
# Issue 6, item 6: `fedee bench ee-overhead` and `fedee bench train` with CUDA, on a GPU machine
# that has Python torch 2.11.0 (CUDA 13) but no Rust toolchain and no network.
#
#   here:   make build data && scripts/gpu-bench.sh pack
#           → target/gpu-bench/: the stripped `fedee` binary (~23 MB) and MiniLM's config.json
#   there:  scripts/gpu-bench.sh run OUT_DIR [BENCH ARGS, e.g. --reps 40]   (from the
#           repository root, with target/gpu-bench copied along; DEVICE=cpu runs the same on
#           the CPU, PYTHON picks the Python with torch [python3])
#
# `run` points LD_LIBRARY_PATH at that machine's torch/lib (the binary was linked against the
# venv's libtorch 2.11.0, the same version), records nvidia-smi, and writes
# OUT_DIR/{ee-overhead,train}-$DEVICE.json; each JSON's "machine" names the GPU, its driver and
# the libtorch version that was loaded.
set -euo pipefail
PACK=target/gpu-bench

case "${1:-}" in
pack)
    mkdir -p "$PACK"
    cp target/release/fedee "$PACK/fedee"
    strip "$PACK/fedee"
    cp data/cache/minilm/config.json "$PACK/config.json"
    du -sh "$PACK"
    ;;
run)
    out="${2:?usage: scripts/gpu-bench.sh run OUT_DIR}"
    device="${DEVICE:-cuda}"
    python="${PYTHON:-python3}"
    mkdir -p "$out"
    torch_lib="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    "$python" -c 'import torch; print("python torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' | tee "$out/torch.txt"
    if command -v nvidia-smi >/dev/null; then nvidia-smi | tee "$out/nvidia-smi.txt"; fi
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    "$PACK/fedee" bench ee-overhead --device "$device" --minilm-config "$PACK/config.json" \
        --json "$out/ee-overhead-$device.json" "${@:3}" 2>&1 | tee "$out/ee-overhead-$device.txt"
    "$PACK/fedee" bench train --device "$device" --minilm-config "$PACK/config.json" \
        --python "$python" --json "$out/train-$device.json" "${@:3}" 2>&1 | tee "$out/train-$device.txt"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
