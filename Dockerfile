# syntax=docker/dockerfile:1
# Training image for GPUs: the package on top of an official PyTorch CUDA runtime image.
#   docker build -t ptuning-pl .
#   docker run --gpus all -v /data/AdvertiseGen:/data -v "$PWD/outputs:/outputs" \
#     -v "$HOME/.cache/huggingface:/cache/huggingface" ptuning-pl experiment=adgen data.dir=/data
# NOTE: this project's CI lints this file with hadolint but does not build or run the image.

# The base ships torch 2.13.0, the version the project is developed and tested on (pyproject.toml allows
# >=2.4,<2.16), built for CUDA 12.6 with cuDNN 9, so pip keeps that torch instead of installing another.
# The CUDA 12.6 build runs on older NVIDIA drivers than a CUDA 13 build, which needs driver 580 or newer.
# For another CUDA version, pass for example
#   --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PTUNING_LOG_DIR=/outputs \
    HF_HOME=/cache/huggingface

# Training runs as uid 1000, the id of the first user account on most Linux hosts, so that the folders that
# account mounts are writable. Ubuntu 24.04 images already contain such a user (ubuntu), older ones get one.
# Run folders go under PTUNING_LOG_DIR (conf/paths/default.yaml) and downloaded models under HF_HOME. Both
# are mount points, created here so that the image also runs without volumes.
RUN if ! id -u 1000 >/dev/null 2>&1; then useradd --create-home --uid 1000 --user-group ptuning; fi \
    && mkdir -p /outputs /cache/huggingface /workspace \
    && chown 1000:1000 /outputs /cache/huggingface /workspace

WORKDIR /opt/ptuning-pl
# Only what building the wheel reads: the metadata, the README it embeds, the package and the config tree.
COPY pyproject.toml README.md ./
COPY src/ src/
COPY conf/ conf/
# A regular (not editable) install: the wheel carries conf/ and the sample data inside the package.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install . \
    && python -c "import ptuning_pl.train"

USER 1000:1000
# Relative paths in arguments (data.dir=data) are taken from here.
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "ptuning_pl.train"]
# Without arguments the image trains the tiny model on the bundled sample, offline and on the CPU.
CMD ["experiment=adgen_tiny"]
