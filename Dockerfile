# syntax=docker/dockerfile:1
# tapeserve images, two targets on the same pinned Python base:
#   docker build --target gpu -t tapeserve:gpu .   tensorflow[and-cuda]: CUDA and cuDNN come as pip wheels;
#                                                  the host's NVIDIA driver comes in through the NVIDIA
#                                                  container toolkit (compose: deploy.resources; k8s:
#                                                  nvidia.com/gpu)
#   docker build --target cpu -t tapeserve:cpu .   tensorflow-cpu, no CUDA (about 1.5 GB smaller)
# Stages: `deps` installs the dependencies of one pyproject.toml extra before any code is copied, so
# that layer (TensorFlow) is rebuilt only when pyproject.toml changes; the runtime stages copy the
# finished virtualenv onto a clean base that has no pip cache, no build files and a non-root user.
# Both flavours share one Python build, so they run exactly the interpreter CI tests with (3.11).

# Pinned to a patch release: a rebuild gets the same interpreter; bump it deliberately.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------- build stages
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml deploy/docker/requirements.py ./

FROM deps AS build-cpu
# Requirements are the version ranges of pyproject.toml (the project's single source of truth).
RUN python requirements.py server >requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
    && tapeserve --help >/dev/null

FROM deps AS build-gpu
RUN python requirements.py gpu >requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
    && tapeserve --help >/dev/null

# ---------------------------------------------------------------- runtime
# Everything both flavours share; the image config (user, health check, command) is inherited.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=1
# A fixed uid/gid, so Kubernetes' runAsUser and file permissions on mounted volumes can name it.
RUN groupadd --system --gid 10001 tapeserve \
    && useradd --system --uid 10001 --gid tapeserve --create-home --home-dir /home/tapeserve tapeserve
WORKDIR /home/tapeserve
USER 10001:10001
EXPOSE 8000
# /healthz needs no worker, so the container is healthy as soon as the API answers; readiness (a warm
# worker) is /readyz, which the load balancer and Kubernetes use. python, because slim has no curl.
# start-period: the API process starts in ~2 s; 20 s leaves room on a loaded host.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# SIGTERM starts the graceful stop: uvicorn stops accepting, in-flight requests finish within
# TAPESERVE_SHUTDOWN_GRACE_S, then the pool drains and stops its workers. Give the container at least
# 2 x TAPESERVE_SHUTDOWN_GRACE_S + 15 s (compose stop_grace_period, k8s terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# Exec form: tapeserve is PID 1's direct child under `init: true` (compose) or PID 1 itself, and gets
# the signal; --host 0.0.0.0 because the container's network namespace is the boundary.
CMD ["tapeserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS cpu
# Owned by root: the service user can run the code but not change it.
COPY --from=build-cpu /opt/venv /opt/venv

# The last stage is what a plain `docker build .` produces: the GPU image the design card asks for.
FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
