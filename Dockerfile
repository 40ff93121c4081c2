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
COPY model_aliases.yaml ./

USER llmproxy
# The outbox must survive restarts: mount persistent storage here.
VOLUME ["/var/lib/llm-proxy"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=1)" || exit 1
ENTRYPOINT ["llm-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
