# syntax=docker/dockerfile:1
# DAPDEE service image: the planner and the edge worker share it.
#   docker build -t dapdee:latest .
#   make secrets      (writes .env: the role tokens; a service bound beyond loopback refuses to
#                      start without them)
#   docker run --env-file .env -p 127.0.0.1:8000:8000 dapdee:latest planner --host 0.0.0.0 --port 8000 --redis-url none
#   docker run --env-file .env -p 127.0.0.1:8001:8000 dapdee:latest edge --host 0.0.0.0 --port 8000 --models @artifacts/fmnist-resnet18 ...
# The image writes nothing outside /tmp: it runs with a read-only root file system (compose
# `read_only`, Kubernetes `readOnlyRootFilesystem`) given a writable /tmp.
# CPU-only torch comes from the PyTorch CPU wheel index (override TORCH_INDEX_URL / TORCH_SPEC
# to pin a version or use a mirror).

ARG PYTHON_VERSION=3.11

# ---- build: a self-contained virtual environment with CPU torch and the project -------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index, so that installing the project never pulls a CUDA build
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dapdee ./dapdee
COPY services ./services
COPY clients ./clients
COPY bench ./bench
RUN pip install . && pip check

# ---- runtime: slim, non-root, only the venv and the trained artifacts ------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/dapdee
RUN groupadd --system --gid 10001 dapdee \
 && useradd --system --uid 10001 --gid dapdee --home-dir /home/dapdee --create-home dapdee
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=10001:10001 artifacts ./artifacts
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["dapdee", "serve"]
CMD ["planner", "--host", "0.0.0.0", "--port", "8000"]
