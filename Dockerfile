# syntax=docker/dockerfile:1
# sobot-proxy: build a wheel with its dependencies, then run it from a slim image as a
# non-root user. Configure it with environment variables (see config/example.env).

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sobot
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels sobot-proxy && rm -rf /wheels
USER 10001
# Nothing is written outside /tmp, so the root file system can be read-only (--read-only
# --tmpfs /tmp): no bytecode caches, and request bodies over 1 MiB are spooled to /tmp.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SOBOT_TEMP_DIR=/tmp
# The proxy listens on 127.0.0.1:8080 by default: a sidecar shares its pod's loopback.
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SOBOT_PROXY_PORT', '8080') + '/healthz', timeout=2)"]
# SIGTERM starts a graceful stop: in-flight requests get 25 s to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sobot-proxy", "serve"]
