# failover-proxy as an edge gateway container.
#   docker build -t failover-proxy .
#   docker run -p 8080:8080 -p 9901:9901 -e LISTEN_HOST=0.0.0.0 \
#       -e ADMIN_HOST=0.0.0.0 -e ADMIN_TOKEN=change-me \
#       -v $PWD/my-config.yaml:/etc/failover-proxy/config.yaml:ro failover-proxy
# The default config (config/example.yaml) reads LISTEN_HOST, ADMIN_HOST and ADMIN_TOKEN from
# the environment; a config of your own reads them only if it says `${LISTEN_HOST:-...}` too.
# A config that fails validation makes the container exit 2 with file:line: field messages.
# `make test-container` builds this file with buildah and runs the image (docs/operations.md).

# Any Debian-like image with Python 3.11+ and its venv module (a pinned official one by default;
# an in-house base: --build-arg BASE=registry.example/python:3.11).
ARG BASE=python:3.11.11-slim-bookworm

# Build stage: the hot modules are compiled with mypyc and three small C extensions, which
# need a C compiler and Python's headers (the official images carry the headers already).
FROM ${BASE} AS build
RUN set -eux; \
    packages="gcc libc6-dev"; \
    python3 -c 'import os, sys, sysconfig; \
        sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
        || packages="$packages python3-dev"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY failover_proxy ./failover_proxy
# The project's wheel and its dependencies' wheels, then a virtualenv from those wheels only.
RUN python3 -m venv /opt/failover-proxy \
    && /opt/failover-proxy/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
    && /opt/failover-proxy/bin/pip install --no-cache-dir --no-index /wheels/*.whl \
    && /opt/failover-proxy/bin/failover-proxy --version

# Runtime stage: the virtualenv only (no compiler, no pip cache), an unprivileged user.
FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/failover-proxy/bin:$PATH
COPY --from=build /opt/failover-proxy /opt/failover-proxy
COPY config/example.yaml /etc/failover-proxy/config.yaml
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent \
        --shell /usr/sbin/nologin failover-proxy
USER 10001:10001
EXPOSE 8080 9901
# Liveness of the admin listener (ADMIN_PORT when the config moves it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ADMIN_PORT', '9901'), timeout=2)"]
# SIGTERM drains: unready at once, in-flight requests finish (drain.delay, drain.timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["failover-proxy"]
CMD ["run", "-c", "/etc/failover-proxy/config.yaml"]
