#!/usr/bin/env bash
# Builds peftopt's one pinned llama.cpp into PREFIX: static llama-quantize and peftopt-generate in bin/,
# convert_hf_to_gguf.py with its conversion/ package and vendored gguf-py beside them, and VERSION.
#
#   docker/build-llama-cpp.sh PREFIX            # `make llama-cpp` and the Dockerfile's builder stage run this
#
# The source is the llama.cpp tree vendored in the llama-cpp-python sdist on PyPI, pinned by version and
# sha256, so a machine that reaches only a package registry builds the very same tools as the image.
# A PREFIX whose VERSION matches the pin is kept as it is (CI caches it), and the new tree is built
# beside PREFIX and renamed into place, so an interrupted build never leaves a half-made prefix behind.
#
# LLAMA_CUDA_ARCHITECTURES (CMake's list, e.g. "90" or "80;86;89;90") also builds bin/peftopt-generate-cuda: the
# same program with ggml's CUDA backend for those GPUs, used to answer the evaluation suite on the GPU when the job
# has one (job/llamacpp.py). It links to the CUDA runtime and cuBLAS that the image's torch already carries, and
# not to the driver (GGML_CUDA_NO_VMM), so it starts wherever CUDA is usable. The compiler comes from
# docker/cuda-toolkit.sh (pinned wheels), or CUDA_TOOLKIT_ROOT when given.
set -euo pipefail

prefix=${1:?usage: build-llama-cpp.sh PREFIX}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
LLAMA_CPP_SDIST_SHA256=${LLAMA_CPP_SDIST_SHA256:-832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e}
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cuda_archs=${LLAMA_CUDA_ARCHITECTURES:-}
stamp="llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION} sha256=${LLAMA_CPP_SDIST_SHA256} generate=$(sha256sum "$here/llama-generate/generate.cpp" | cut -c1-16)"
[[ -z "$cuda_archs" ]] || stamp="$stamp cuda=$cuda_archs build=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

if [[ -f "$prefix/VERSION" ]] && grep -qxF "$stamp" "$prefix/VERSION"; then
  echo "llama.cpp already built in $prefix ($stamp)"
  exit 0
fi

# The extracted source and the build tree are kept beside PREFIX (LLAMA_CPP_KEEP_BUILD=0 drops them), so a
# change to peftopt-generate alone recompiles one file; the image's builder stage keeps nothing.
keep=${LLAMA_CPP_KEEP_BUILD:-1}
tree="$prefix.build/${LLAMA_CPP_PYTHON_VERSION}-${LLAMA_CPP_SDIST_SHA256:0:12}"
work=$(mktemp -d "${TMPDIR:-/tmp}/llama-cpp-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
[[ "$keep" == 1 ]] || tree="$work/tree"
src="$tree/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"

if [[ ! -f "$src/CMakeLists.txt" ]]; then
  rm -rf "$prefix.build"
  sdist=${LLAMA_CPP_SDIST:-}
  if [[ -z "$sdist" ]]; then  # fetched from the package index and checked, with nothing built to get it
    sdist=$("$PYTHON" "$here/fetch-sdist.py" llama-cpp-python "$LLAMA_CPP_PYTHON_VERSION" "$LLAMA_CPP_SDIST_SHA256" "$work/sdist")
  fi
  echo "${LLAMA_CPP_SDIST_SHA256}  ${sdist}" | sha256sum -c --quiet -
  mkdir -p "$tree"
  tar xzf "$sdist" -C "$tree" "llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
  rm -rf "$src/.git"  # a dangling submodule pointer in the sdist
fi

generator=$(command -v ninja >/dev/null && echo Ninja || echo "Unix Makefiles")  # ninja is faster, make is enough
# A kept build tree is reused only where it was configured, from this checkout: CMake refuses a cache made from
# another source directory (a clone at another path, a copied cache), so such a tree starts over.
for build in "$tree/build" "$tree/build-cuda"; do
  cache="$build/CMakeCache.txt"
  if [[ -f "$cache" ]] && ! { grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$here/llama-generate" "$cache" \
                               && grep -qxF "CMAKE_CACHEFILE_DIR:INTERNAL=$build" "$cache"; }; then
    rm -rf "$build"
  fi
done
cmake -S "$here/llama-generate" -B "$tree/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CPP_SOURCE="$src" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF >/dev/null
cmake --build "$tree/build" --target llama-quantize peftopt-generate -j "$JOBS"

if [[ -n "$cuda_archs" ]]; then
  cuda_root=${CUDA_TOOLKIT_ROOT:-$("$here/cuda-toolkit.sh" "$(dirname "$prefix")/cuda-toolkit-13.0")}
  # peftopt-generate is the one target (llama-quantize stays the CPU build's). Without flash attention's kernels
  # (GGML_CUDA_FA=OFF: 40% of the objects' size; a suite's short decode does not need them) and without a
  # run path into the build machine's toolkit: the libraries are found where the job says (LD_LIBRARY_PATH).
  cmake -S "$here/llama-generate" -B "$tree/build-cuda" -G "$generator" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CPP_SOURCE="$src" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_SKIP_RPATH=ON \
    -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DGGML_CUDA_FA=OFF -DCMAKE_CUDA_ARCHITECTURES="$cuda_archs" \
    -DCUDAToolkit_ROOT="$cuda_root" -DCMAKE_CUDA_COMPILER="$cuda_root/bin/nvcc" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF >/dev/null
  cmake --build "$tree/build-cuda" --target peftopt-generate -j "$JOBS"
fi

staging="$prefix.tmp.$$"
rm -rf "$staging" "$prefix".tmp.*
mkdir -p "$staging/bin"
cp "$(find "$tree/build" -type f -name llama-quantize -perm -u+x | head -n1)" "$staging/bin/"
cp "$tree/build/peftopt-generate" "$staging/bin/"
[[ -z "$cuda_archs" ]] || cp "$tree/build-cuda/peftopt-generate" "$staging/bin/peftopt-generate-cuda"
cp "$src/convert_hf_to_gguf.py" "$staging/"
cp -r "$src/conversion" "$src/gguf-py" "$staging/"
cp "$src/LICENSE" "$staging/LICENSE.llama.cpp"
find "$staging" -name __pycache__ -prune -exec rm -rf {} +
echo "$stamp" > "$staging/VERSION"
help_text=$("$staging/bin/llama-quantize" --help 2>&1 || true)
[[ "$help_text" == *usage* ]] || { echo "llama-quantize does not run: $help_text" >&2; exit 1; }
rm -rf "$prefix"
mkdir -p "$(dirname "$prefix")"
mv "$staging" "$prefix"
echo "built llama.cpp into $prefix ($stamp)"
