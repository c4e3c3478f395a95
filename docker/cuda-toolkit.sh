#!/usr/bin/env bash
# Lays out a CUDA 13.0 toolkit in DIR from NVIDIA's wheels on the package index (docker/cuda-toolkit.txt, pinned
# by hash): nvcc and its cicc, the headers, and the runtime and cuBLAS to link against. Enough for CMake's
# FindCUDAToolkit and for building ggml's CUDA backend; no driver is needed to build.
#
#   docker/cuda-toolkit.sh DIR      # prints the toolkit's root (DIR/nvidia/cu13)
set -euo pipefail
dir=${1:?usage: cuda-toolkit.sh DIR}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root="$dir/nvidia/cu13"
if [[ -x "$root/bin/nvcc" && -f "$dir/.complete" ]] && cmp -s "$here/cuda-toolkit.txt" "$dir/.complete"; then
  echo "$root"
  exit 0
fi
rm -rf "$dir"
mkdir -p "$dir/wheels"
"$PYTHON" -m pip download --quiet --no-deps --require-hashes -r "$here/cuda-toolkit.txt" -d "$dir/wheels" >&2
for wheel in "$dir"/wheels/*.whl; do
  "$PYTHON" -m zipfile -e "$wheel" "$dir"
done
rm -rf "$dir/wheels"
chmod +x "$root"/bin/* "$root"/nvvm/bin/*  # zip entries lose their mode bits
ln -sfn lib "$root/lib64"
for lib in cudart cublas cublasLt; do
  ln -sf "lib$lib.so.13" "$root/lib/lib$lib.so"
done
cp "$here/cuda-toolkit.txt" "$dir/.complete"
echo "$root"
