# syntax=docker/dockerfile:1
# sobot-proxy: build wheels for the project and the dependencies its pyproject.toml declares,
# then install them into a slim image and run `sobot-proxy serve` as a non-root user.
# Configure it with environment variables (config/example.env; deployment examples: config/).
#
#   docker build -t sobot-proxy .
#   docker run --read-only --tmpfs /tmp --stop-timeout 30 \
#     -e SOBOT_APPID=... -e SOBOT_REGION=sg -e SOBOT_SHUTDOWN_GRACE=25 \
#     -e SOBOT_APP_KEY_FILE=/run/secrets/sobot_app_key \
#     -v "$PWD/app_key:/run/secrets/sobot_app_key:ro" sobot-proxy

# Pinned to a patch release; pin the digest too (python:3.11.11-slim-bookworm@sha256:...) for
# builds that must be reproducible byte for byte.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# The dependencies come from pyproject.toml's [project] dependencies, nothing else.
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 sobot \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --shell /usr/sbin/nologin sobot
COPY --from=build /wheels /wheels
# Compiled to bytecode here, at build time: at run time the file system may be read-only.
RUN pip install --no-cache-dir --no-index --find-links=/wheels sobot-proxy && rm -rf /wheels
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Nothing is written outside /tmp, so the root file system can be read-only (--read-only
# --tmpfs /tmp): no bytecode caches, and request bodies over 1 MiB are spooled to /tmp.
#
# Stopping: on SIGTERM the proxy stops accepting at once, gives requests in flight up to
# SOBOT_SHUTDOWN_GRACE seconds, then closes (measured: up to 1.6 s more). The runtime must
# wait longer than that before its SIGKILL. `docker stop` waits 10 s by default, so the image's
# grace is 7 s (7 + 1.6 < 10): a plain `docker stop` never cuts a drain short. For the proxy's
# own default of 25 s, set SOBOT_SHUTDOWN_GRACE=25 together with a longer wait: `docker run
# --stop-timeout 30`, Compose `stop_grace_period: 30s`, Kubernetes
# `terminationGracePeriodSeconds` (see config/; tests/test_deploy_examples.py checks them).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SOBOT_TEMP_DIR=/tmp \
    SOBOT_SHUTDOWN_GRACE=7
# The proxy listens on 127.0.0.1:8080 by default: a sidecar shares its pod's loopback.
EXPOSE 8080
# Liveness, for Docker and Compose (Kubernetes ignores HEALTHCHECK: its probes are in the pod
# spec). /healthz answers 200 whenever the process serves, with or without a token or client
# keys. The probe runs inside the container, so it reaches a proxy listening on 127.0.0.1 (or on
# every address); it ignores any HTTP(S)_PROXY in the environment (ProxyHandler({})).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-I", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('SOBOT_PROXY_PORT', '8080'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sobot-proxy", "serve"]
