# peftopt image: `docker run --gpus all -v $PWD/runs:/runs peftopt:0.1.0 jobspecs/t3.json` runs that jobspec.
#   make image          builds it (docker build --network host -t peftopt:0.1.0 .)
# Stage 1 builds the pinned llama.cpp with the script `make llama-cpp` runs. Stage 2 is Debian's Python with
# the locked packages (requirements.lock): torch's CUDA 13 libraries come as wheels beside it, so a CUDA base
# image would only hold them twice. The host needs an NVIDIA driver of the 580 series or newer; for older
# drivers, --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 installs torch's CUDA 12.8 build.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS llama-cpp
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make cmake ninja-build python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY docker/build-llama-cpp.sh docker/fetch-sdist.py docker/cuda-toolkit.sh docker/cuda-toolkit.txt /src/docker/
COPY docker/llama-generate /src/docker/llama-generate
# The GPU architectures of peftopt-generate-cuda, which answers the evaluation suite with each GGUF on the job's GPU
# (T4, A100, A10/RTX 30, L4/RTX 40, H100/H200); empty builds the CPU tools alone. Its compiler comes as NVIDIA's
# wheels (docker/cuda-toolkit.txt), and nothing of it stays in the image but the program.
ARG LLAMA_CUDA_ARCHITECTURES="75;80;86;89;90"
RUN LLAMA_CPP_KEEP_BUILD=0 LLAMA_CUDA_ARCHITECTURES="${LLAMA_CUDA_ARCHITECTURES}" \
    bash /src/docker/build-llama-cpp.sh /opt/llama.cpp

FROM ${BASE_IMAGE} AS runtime
# gcc and the Python headers stay: Triton (unsloth's kernels) compiles a small helper on first GPU use.
# tini is PID 1, so `docker stop` reaches peftopt and llama.cpp's processes are reaped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 peftopt \
 && mkdir -p /data /runs && chmod 1777 /data /runs
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf-home LLAMA_CPP_DIR=/opt/llama.cpp PEFTOPT_LOG_FORMAT=json \
    UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
ARG TORCH_INDEX_URL=
COPY requirements.lock docker/requirements-harness.lock docker/install-locked.sh /tmp/lock/
# lm-evaluation-harness (evaluate.harness) lives apart, in /opt/harness: only its child process has it on its path,
# so the job's own imports never pick up scikit-learn and the rest.
RUN python3 -m venv /opt/venv \
 && sh /tmp/lock/install-locked.sh /tmp/lock/requirements.lock "${TORCH_INDEX_URL}" \
 && pip install --no-cache-dir --no-deps --require-hashes --target /opt/harness -r /tmp/lock/requirements-harness.lock \
 && rm -rf /tmp/lock
COPY --from=llama-cpp /opt/llama.cpp /opt/llama.cpp
COPY docker/entrypoint.sh /usr/local/bin/peftopt-entrypoint
WORKDIR /app
COPY pyproject.toml README.md ./
COPY job ./job
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf build ./*.egg-info
COPY jobspecs ./jobspecs
USER 1000:1000
VOLUME ["/data", "/runs"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/peftopt-entrypoint"]
CMD ["--help"]
