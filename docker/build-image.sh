#!/usr/bin/env bash
# `make image`: builds the image users run, from the Dockerfile with build arguments only.
#   docker/build-image.sh [TAG] [docker build options...]      # TAG defaults to peftopt:<version>
# The base image is pulled, or made from Debian's packages where no registry answers (standin-base.sh).
# --network host lets pip and apt reach the package registries where the build network cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
tag=${1:-peftopt:$version}
shift || true
bash docker/standin-base.sh
started=$(date +%s)
docker build --network host -t "$tag" "$@" .
echo "built $tag in $(( $(date +%s) - started )) s; $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
