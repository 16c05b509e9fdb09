# failover-proxy as an edge gateway container.
#   docker build -t failover-proxy .
#   docker run -p 8080:8080 -v $PWD/config/example.yaml:/etc/failover-proxy/config.yaml:ro \
#       -e LISTEN_HOST=0.0.0.0 failover-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY failover_proxy ./failover_proxy
COPY config ./config
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 proxy \
    && mkdir -p /etc/failover-proxy \
    && cp config/example.yaml /etc/failover-proxy/config.yaml
USER proxy
EXPOSE 8080
# A config that fails validation makes the container exit 2 with file:line: field messages.
ENTRYPOINT ["failover-proxy"]
CMD ["run", "-c", "/etc/failover-proxy/config.yaml"]
