"""`llm-proxy credit-api`: the credit API and the store page as a service of their own.

Same configuration as the proxy: the YAML file (`packages:`, `rewards:`, `auth:`,
`guard.prefix`) and the environment (`LEDGER_DATABASE_URL`, `REDIS_URL` for user keys
and holds, `CREDIT_WEBHOOK_SECRET` for the payment webhook).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from proxy.config import EnvSettings, load_config
from proxy.errors import ConfigError, LedgerNotMigrated, StartupError
from proxy.ledger.credit_api.app import CreditApiOptions, build_credit_app

log = logging.getLogger(__name__)

DEFAULT_PORT = 8090


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}")
    return value


def register_credit_api(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    p = subparsers.add_parser(
        "credit-api",
        parents=parents,
        help="serve the credit API (/v1/credit/...) and the store page (/store)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file (default: $LLM_PROXY_CONFIG or model_aliases.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port to listen on")
    p.set_defaults(func=cmd_credit_api)


def cmd_credit_api(args: argparse.Namespace, settings: EnvSettings) -> int:
    try:
        config = load_config(settings.config_file(args.config))
    except ConfigError as exc:
        raise ConfigError(f"configuration error: {exc}") from None
    app = build_credit_app(CreditApiOptions.of(config, settings))
    try:
        asyncio.run(_serve(app, args.host, args.port))
    except LedgerNotMigrated as exc:
        raise ConfigError(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        orig = getattr(exc, "orig", None) or exc
        line = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        raise StartupError(f"credit-api: database: {line}") from None
    return 0


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
        log.info("credit api on http://%s:%d (store page: /store)", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
