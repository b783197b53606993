# syntax=docker/dockerfile:1
# The Ray head and worker image: rayproject/ray at the Ray version pyproject.toml pins, plus hutch
# with torch and DeepSpeed. One file, two variants (docker/README.md has the build commands):
#   VARIANT=cu128  GPU nodes (the gpu overlay; the default): a CUDA 12.8 developer base (nvcc)
#   VARIANT=cpu    CPU-only nodes (the dev overlay)
# Python 3.11 (py311), as in the control-plane image and CI.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cu128
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
# torch is the version CI tests (requirements-dev.txt). PyTorch dropped CUDA 12.8 wheels after 2.11,
# so for VARIANT=cu128 the default index is cu126: torch's CUDA wheels bring their own CUDA runtime
# and need only a driver new enough for 12.6 (the cu128 base already asks for 12.8), and DeepSpeed
# accepts the base's CUDA 12.8 nvcc with a CUDA 12.6 torch when it compiles an op. TORCH_INDEX
# overrides the choice (a PyTorch wheel index name: cpu, cu126, cu130, ...).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=""

LABEL org.opencontainers.image.title="hutch-ray" \
      org.opencontainers.image.description="Ray head/worker image for hutch jobs (AdaHessian on Ray Train)" \
      org.opencontainers.image.version="0.1.0"

# DeepSpeed compiles a C++ op the first time a job starts it (deepspeed_shm_comm on CPU): it needs
# g++ (the CPU base removes it), ninja (pip, below) and the Python headers (the base's conda Python
# has them). apt needs root; the image's own user comes back right after.
USER 0:0
# g++ is not pinned to a version: the base tag fixes the Ubuntu release, and its archive drops
# superseded package versions, so an exact pin would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
USER 1000:100

# Compiled ops are cached here (torch's default place, made explicit so a volume can be mounted on
# it). They are built with -march=native, so keep one cache per node, not one shared by all.
ENV TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN index="${TORCH_INDEX}"; \
    if [ -z "${index}" ]; then \
      case "${VARIANT}" in \
        cpu) index=cpu ;; \
        cu128) index=cu126 ;; \
        *) echo "no torch wheel index known for VARIANT=${VARIANT}: pass --build-arg TORCH_INDEX=..." >&2; exit 1 ;; \
      esac; \
    fi; \
    python -m pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${index}" \
      "torch==${TORCH_VERSION}"

# The rest of hutch's dependencies (pyproject.toml, its deepspeed and hf extras), pinned to the versions
# CI tests; hutch itself is installed with --no-deps below, so this list is complete on purpose
# (tests/unit/test_images.py checks it against pyproject.toml).
COPY --chown=1000:100 docker/control-plane-requirements.txt /tmp/hutch/control-plane-requirements.txt
RUN python -m pip install --no-cache-dir \
      -r /tmp/hutch/control-plane-requirements.txt \
      "ray[train,default]==${RAY_VERSION}" \
      numpy==2.4.6 \
      scikit-learn==1.9.1 \
      matplotlib==3.11.2 \
      deepspeed==0.19.8 \
      ninja==1.13.2 \
      transformers==5.25.0

COPY --chown=1000:100 pyproject.toml README.md /tmp/hutch/src/
COPY --chown=1000:100 api /tmp/hutch/src/api
COPY --chown=1000:100 service /tmp/hutch/src/service
COPY --chown=1000:100 trainer /tmp/hutch/src/trainer
# The jobs' entrypoint is `python -m trainer` (service/launcher.py); pip check fails the build if the
# pins above broke a package of the base image.
RUN python -m pip install --no-cache-dir --no-deps /tmp/hutch/src \
 && rm -rf /tmp/hutch \
 && mkdir -p "${TORCH_EXTENSIONS_DIR}" \
 && python -m pip check \
 && python -m trainer --help > /dev/null \
 && python -c "import torch, deepspeed, transformers, trainer.launch, trainer.worker"

WORKDIR /home/ray
