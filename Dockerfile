# failover-proxy as an edge gateway container.
#   docker build -t failover-proxy .
#   docker run -p 8080:8080 -p 9901:9901 -e LISTEN_HOST=0.0.0.0 \
#       -e ADMIN_HOST=0.0.0.0 -e ADMIN_TOKEN=change-me \
#       -v $PWD/my-config.yaml:/etc/failover-proxy/config.yaml:ro failover-proxy
# A config that fails validation makes the container exit 2 with file:line: field messages.

# Build stage: the data plane is compiled with mypyc, which needs a C compiler.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY failover_proxy ./failover_proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: the wheels only, no compiler, an unprivileged user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 proxy
WORKDIR /app
COPY config ./config
RUN mkdir -p /etc/failover-proxy && cp config/example.yaml /etc/failover-proxy/config.yaml
USER proxy
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["failover-proxy"]
CMD ["run", "-c", "/etc/failover-proxy/config.yaml"]
