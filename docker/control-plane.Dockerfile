# syntax=docker/dockerfile:1
# The control plane: `hutch serve` (REST API, job store, reconciler) without torch or CUDA. It talks
# to a Ray cluster (HUTCH_RAY_ADDRESS) that runs the jobs in the Ray image (docker/ray.Dockerfile).
# Python 3.11, as in the Ray image (py311) and CI.
FROM python:3.11.17-slim-bookworm

LABEL org.opencontainers.image.title="hutch-control-plane" \
      org.opencontainers.image.description="hutch control plane: REST API, job store and reconciler" \
      org.opencontainers.image.version="0.1.0"

# HUTCH_DATA_DIR: the SQLite file and generated API token when no database or tokens are configured,
# and the home of the service's user; the Deployment mounts an emptyDir there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HUTCH_DATA_DIR=/var/lib/hutch \
    HOME=/var/lib/hutch

# uid 1000, gid 100 ("users"): the Ray image's `ray` user, so run directories on the shared volume
# are readable and writable from both sides.
RUN useradd --uid 1000 --gid 100 --home-dir /var/lib/hutch --no-create-home --shell /usr/sbin/nologin hutch \
 && mkdir -p /var/lib/hutch \
 && chown 1000:100 /var/lib/hutch

# The control plane's own dependency list, not pyproject.toml's (which includes torch).
COPY docker/control-plane-requirements.txt /tmp/hutch/control-plane-requirements.txt
RUN python -m pip install --no-cache-dir -r /tmp/hutch/control-plane-requirements.txt

COPY pyproject.toml README.md /tmp/hutch/src/
COPY api /tmp/hutch/src/api
COPY service /tmp/hutch/src/service
COPY trainer /tmp/hutch/src/trainer
RUN python -m pip install --no-cache-dir --no-deps /tmp/hutch/src \
 && rm -rf /tmp/hutch \
 && python -m pip check \
 && hutch serve --help > /dev/null \
 && python -c "import sys, api.app, service.control_plane; assert 'torch' not in sys.modules"

USER 1000:100
WORKDIR /var/lib/hutch
EXPOSE 8000
# 0.0.0.0 inside the container only; the Service decides who reaches it.
CMD ["hutch", "serve", "--host", "0.0.0.0", "--port", "8000"]
