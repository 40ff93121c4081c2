"""Running one proxy process: the event loop choice and aiohttp's runner."""

from __future__ import annotations

import asyncio
import gc
import logging

from aiohttp import web

from proxy.config import EnvSettings, YamlConfig, load_config
from proxy.errors import StartupError
from proxy.server.app import build_app
from proxy.server.lifecycle import EmbeddedLedgerFactory
from proxy.server.options import ServeOptions

log = logging.getLogger(__name__)

_YOUNG_GC_THRESHOLD = 10_000  # container allocations between young collections (default 700)


def install_event_loop(choice: str) -> str:
    """uvloop when asked or available (`auto`); the numbers in bench/ say it pays."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit(
                    "uvloop requested but not installed (pip install uvloop)"
                ) from None
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def serve_one(
    options: ServeOptions,
    config: YamlConfig | None = None,
    settings: EnvSettings | None = None,
    *,
    reuse_port: bool = False,
    embedded_ledger: EmbeddedLedgerFactory | None = None,
) -> int:
    """One proxy process until SIGTERM/SIGINT; `reuse_port` when it is one of
    `--workers N` (proxy/server/workers.py). Raises ConfigError for a bad file."""
    config = config or load_config(options.config_path)
    settings = settings or EnvSettings.from_env()
    loop_name = install_event_loop(options.loop)
    log.info("config %s loaded; event loop %s", options.config_path, loop_name)
    app = build_app(config, settings, embedded_ledger=embedded_ledger)
    app.on_startup.append(_tune_gc)
    try:
        web.run_app(
            app,
            host=options.host,
            port=options.port,
            access_log=None,  # our own structured access log replaces aiohttp's
            shutdown_timeout=config.server.shutdown_grace_s,
            handler_cancellation=True,  # a client disconnect stops the upstream read at once
            reuse_port=reuse_port or None,
            print=lambda msg: log.info("%s", msg.strip()),
        )
    except OSError as exc:
        raise listen_failed(options.host, options.port, exc) from None
    return 0


async def _tune_gc(app: web.Application) -> None:
    """After start-up (config, encodings, pools: long-lived): out of the collector's
    sight, and young collections less often. A request allocates a few hundred
    container objects that all die with it; at the default threshold (700) a young
    collection ran every couple of requests and promoted the live ones of the
    requests in flight, ~5% of the relay's CPU in py-spy samples (bench/RESULTS.md)."""
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(_YOUNG_GC_THRESHOLD, mid, old)


def listen_failed(host: str, port: int, exc: OSError) -> StartupError:
    """What a failed bind means, in one line (EADDRINUSE, a host that does not resolve)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return StartupError(f"cannot listen on {host}:{port}: {reason}")
