#!/usr/bin/env bash
# Resolves peftopt's dependencies once and writes them down with hashes (`make lock`):
#   requirements.lock             the image: Linux x86_64, CPython 3.11 (Debian bookworm), torch 2.13.0 with
#                                 its CUDA 13 libraries from PyPI, unsloth, the demo model, the trackers
#   docker/requirements-harness.lock  the harness extra's packages the image lacks, for /opt/harness
#   docker/requirements-cpu.lock  the CPU venv of `make install` and CI: no GPU extra, no CUDA libraries;
#                                 torch itself is installed first from its CPU wheel (same version)
# Both are cut from one resolution of every extra together, so a package in both has the same version in
# both. uv rather than pip-tools: a package's wrong bound (docker/lock-overrides.txt) can only be overridden
# in uv; pip-compile stops at "No matching distribution found for certifi>=2026.10.19".
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --override docker/lock-overrides.txt
        --custom-compile-command "make lock" --quiet)
universe=$(mktemp -d)/universe.txt
trap 'rm -rf "$(dirname "$universe")"' EXIT
# The locks already written are uv's preferences: a package keeps its version unless the change asks for another
# (`rm` both locks first to re-resolve everything).
cat requirements.lock docker/requirements-cpu.lock 2>/dev/null | grep -E '^[A-Za-z0-9._-]+==' | sed 's/ .*//' | sort -u > "$universe" || true
"$UV" pip compile pyproject.toml --all-extras "${common[@]}" -o "$universe"
"$UV" pip compile pyproject.toml --extra gpu --extra demo --extra tracking -c "$universe" --generate-hashes \
  "${common[@]}" -o requirements.lock
# The harness extra for the image goes to a directory of its own (/opt/harness, on the path of the harness's child
# process only: transformers imports scikit-learn whenever it can find it): its packages that the image lacks.
in_image=()
for name in $(grep -oE '^[A-Za-z0-9._-]+==' requirements.lock | tr -d '='); do in_image+=(--no-emit-package "$name"); done
sed -n 's/^harness = \[\(.*\)\]$/\1/p' pyproject.toml | tr -d '" ' | tr ',' '\n' > "$(dirname "$universe")/harness.in"
"$UV" pip compile "$(dirname "$universe")/harness.in" -c "$universe" --generate-hashes "${common[@]}" "${in_image[@]}" \
  -o docker/requirements-harness.lock
# torch's CUDA runtime (nvidia-*, cuda-*, triton) comes with PyPI's torch wheel only; the CPU wheel needs none.
cuda_only=()
for name in torch $(grep -oE '^(nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|triton)==' "$universe" | tr -d '='); do
  cuda_only+=(--no-emit-package "$name")
done
"$UV" pip compile pyproject.toml --extra demo --extra test --extra tracking --extra harness -c "$universe" --generate-hashes \
  "${common[@]}" "${cuda_only[@]}" -o docker/requirements-cpu.lock
# The resolution's temporary file is no input anyone can rerun with: keep it out of the annotations.
sed -i -E '/^ *# *(via )?-c .*universe\.txt$/d; s|^( *# *(via )?-r ).*harness\.in$|\1the harness extra (pyproject.toml)|' \
  requirements.lock docker/requirements-cpu.lock docker/requirements-harness.lock
echo "wrote requirements.lock ($(grep -c '^[a-z]' requirements.lock) packages), docker/requirements-harness.lock" \
  "($(grep -c '^[a-z]' docker/requirements-harness.lock)) and docker/requirements-cpu.lock ($(grep -c '^[a-z]' docker/requirements-cpu.lock))"
