# Production image: slim Python, non-root, `llm-proxy serve` as the entrypoint.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LLM_PROXY_CONFIG=/app/model_aliases.yaml \
    LLM_PROXY_OUTBOX_PATH=/var/lib/llm-proxy/outbox.sqlite3 \
    LLM_PROXY_SINK_PATH=/var/lib/llm-proxy/charge-events.jsonl

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install '.[fast]' \
    && useradd --system --uid 10001 --home-dir /app llmproxy \
    && mkdir -p /var/lib/llm-proxy && chown llmproxy /var/lib/llm-proxy
# The container configuration: like ./model_aliases.yaml, but no provider at 127.0.0.1
# (inside a container that is the container itself). Mount your own over it, or point
# LLM_PROXY_CONFIG elsewhere (deploy/docker-compose.yml mounts deploy/model_aliases.yaml).
COPY deploy/model_aliases.yaml ./model_aliases.yaml

USER llmproxy
# The outbox must survive restarts: mount persistent storage here.
VOLUME ["/var/lib/llm-proxy"]
EXPOSE 8080
# SIGTERM drains: in-flight requests get server.shutdown_grace_s (30 s), then the outbox
# server.outbox_drain_s (10 s). Docker's default stop timeout (10 s) is shorter: stop with
# `docker stop -t 50` / compose `stop_grace_period: 50s` / Kubernetes
# `terminationGracePeriodSeconds: 50` (above the sum), or lower those two settings.
STOPSIGNAL SIGTERM
# Liveness only; readiness (503 when nothing can be served) is GET /readyz.
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=1)" || exit 1
ENTRYPOINT ["llm-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
