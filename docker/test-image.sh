#!/usr/bin/env bash
# `make test-image`: a Docker engine (started here if none answers, and stopped again), the image built from
# the Dockerfile with build arguments only (no CUDA build of peftopt-generate, below), then tests/image/test_image.py run against it.
#   docker/test-image.sh IMAGE PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: test-image.sh IMAGE PYTHON}
python=${2:?usage: test-image.sh IMAGE PYTHON}
engine=$(bash docker/engine.sh start)
[[ "$engine" != started ]] || trap 'bash docker/engine.sh stop' EXIT
# Without the CUDA build of peftopt-generate: compiling its kernels for five GPU architectures takes over an hour on
# CI's two cores, and a CPU-only runner could not run it (the image's tests exercise the CPU path it falls back to).
bash docker/build-image.sh "$image" --build-arg LLAMA_CUDA_ARCHITECTURES=
PEFTOPT_IMAGE="$image" "$python" -m pytest -q -rs tests/image
