# peftopt image: `docker run --gpus all peftopt jobspecs/t3.json` runs that jobspec end to end.
#   docker build -t peftopt .
# Stage 1 builds the pinned llama.cpp (llama-quantize, peftopt-generate, the converter) with the same
# script `make llama-cpp` runs; stage 2 is a CUDA runtime with the project and those tools only.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

FROM ubuntu:${UBUNTU_VERSION} AS llama-cpp
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY docker/build-llama-cpp.sh /src/docker/build-llama-cpp.sh
COPY docker/llama-generate /src/docker/llama-generate
RUN PIP_BREAK_SYSTEM_PACKAGES=1 LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION} \
    bash /src/docker/build-llama-cpp.sh /opt/llama.cpp

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG PEFTOPT_VERSION=0.1.0
LABEL org.opencontainers.image.title="peftopt" \
      org.opencontainers.image.version="${PEFTOPT_VERSION}" \
      org.opencontainers.image.description="Batch job runner for LoRA/QLoRA fine-tuning with verified GGUF export" \
      peftopt.torch="${TORCH_VERSION}" peftopt.cuda="${CUDA_VERSION}" peftopt.llama-cpp-python="0.3.36"
# gcc stays: Triton (unsloth's kernels) compiles a small helper on first GPU use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf-home LLAMA_CPP_DIR=/opt/llama.cpp PEFTOPT_LOG_FORMAT=json
RUN python3 -m venv /opt/venv
COPY docker/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir -c /tmp/constraints.txt transformers peft trl datasets accelerate huggingface_hub tokenizers \
    safetensors sentencepiece protobuf gguf click structlog pydantic sacrebleu matplotlib bitsandbytes unsloth unsloth_zoo
COPY --from=llama-cpp /opt/llama.cpp /opt/llama.cpp
WORKDIR /app
COPY pyproject.toml README.md ./
COPY job ./job
COPY jobspecs ./jobspecs
RUN pip install --no-cache-dir --no-deps . && useradd --create-home --uid 1000 peftopt && mkdir -p /data /runs \
 && chown peftopt /data /runs
USER 1000:1000
VOLUME ["/data", "/runs"]
COPY docker/entrypoint.sh /usr/local/bin/peftopt-entrypoint
ENTRYPOINT ["/usr/local/bin/peftopt-entrypoint"]
CMD ["--help"]
