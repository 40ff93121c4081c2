"""What `llm-proxy serve` was asked for. Kept free of heavy imports: a worker
process unpickles it before it may import prometheus_client (whose mode is fixed
at import by PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

from dataclasses import dataclass

LOOP_CHOICES = ("auto", "asyncio", "uvloop")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    config_path: str
    host: str = "127.0.0.1"
    port: int = 8080
    loop: str = "auto"
    log_level: str = "info"
    workers: int = 1
