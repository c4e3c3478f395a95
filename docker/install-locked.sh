#!/bin/sh
# Installs a lock file (docker/lock.sh) into the active environment: exactly the files it names, hashes
# checked, no resolver run.
#   sh docker/install-locked.sh requirements.lock [TORCH_INDEX_URL]
# With TORCH_INDEX_URL (https://download.pytorch.org/whl/cu128 for hosts whose NVIDIA driver predates CUDA
# 13), torch and torchvision of the locked versions come from that index with its CUDA libraries, and the
# lock's CUDA 13 packages are left out.
set -eu
lock=$1
torch_index=${2:-}
if [ -z "$torch_index" ]; then
  exec pip install --no-cache-dir --no-deps --require-hashes -r "$lock"
fi
version_of() { sed -n "s/^$1==\([^ ]*\).*/\1/p" "$lock"; }
rest=$(mktemp)
# A requirement is its "name==version \" line and the indented lines after it.
awk '/^[a-z]/ { skip = ($0 ~ /^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==/) } !skip' "$lock" > "$rest"
pip install --no-cache-dir --no-deps --require-hashes -r "$rest"
pip install --no-cache-dir --index-url "$torch_index" "torch==$(version_of torch)" "torchvision==$(version_of torchvision)"
rm -f "$rest"
