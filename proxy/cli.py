"""`llm-proxy` sub-commands. No business logic here: each command wires modules together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources

from aiohttp import web

from proxy.config import Config, Settings, config_path_from_env, load_config
from proxy.errors import ConfigError
from proxy.ledger_cli import register as register_ledger_commands
from proxy.observability import plain_access_log

log = logging.getLogger("proxy.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # Access lines are bare JSON objects on stdout, one per request, for log shippers.
    plain_access_log(sys.stdout)


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


def _load_config(path: str) -> Config | None:
    """The validated config, or None after telling why (the caller exits 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"llm-proxy: configuration error: {exc}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_config(config_path_from_env(args.config))
    if config is None:
        return 2
    if args.workers > 1:
        from proxy.workers import run_workers

        # Workers get the grace period plus the outbox drain before being killed.
        grace = config.server.shutdown_grace_s + config.server.outbox_drain_s + 5
        return run_workers(args, stop_timeout_s=grace)
    return serve_one(args, config)


def serve_one(
    args: argparse.Namespace, config: Config | None = None, *, reuse_port: bool = False
) -> int:
    """One proxy process; `reuse_port` when it is one of `--workers N` (proxy/workers.py)."""
    from proxy.app import build_app

    path = config_path_from_env(args.config)
    config = config or _load_config(path)
    if config is None:
        return 2
    loop_name = install_event_loop(args.loop)
    settings = Settings.from_env()
    log.info("config %s loaded; event loop %s", path, loop_name)
    app = build_app(config, settings)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,  # our own structured access log replaces aiohttp's
        shutdown_timeout=config.server.shutdown_grace_s,
        handler_cancellation=True,  # a client disconnect stops the upstream read at once
        reuse_port=reuse_port or None,
        print=lambda msg: log.info("%s", msg.strip()),
    )
    return 0


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    from proxy.fake_upstream import Behaviour, build_fake_app

    install_event_loop(args.loop)
    behaviour = Behaviour(
        chunks=args.chunks, chunk_delay=args.delay, first_byte_delay=args.first_byte_delay
    )
    web.run_app(
        build_fake_app(behaviour),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda msg: log.info("fake upstream: %s", msg.strip()),
        handler_cancellation=True,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Proxy plus fake upstream in one process: the offline quick start."""
    from proxy.app import build_app
    from proxy.config import load_config
    from proxy.fake_upstream import Behaviour, build_fake_app

    demo_file = resources.files("proxy").joinpath("demo_aliases.yaml")
    with resources.as_file(demo_file) as path:
        config = load_config(path)
    settings = Settings.from_env()
    install_event_loop(args.loop)

    async def main() -> None:
        fake = web.AppRunner(
            build_fake_app(Behaviour(chunk_delay=args.delay)),
            access_log=None,
            handler_cancellation=True,
        )
        await fake.setup()
        await web.TCPSite(fake, "127.0.0.1", 18001).start()
        runner = web.AppRunner(
            build_app(config, settings), access_log=None, handler_cancellation=True
        )
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        log.info(
            "demo proxy on http://%s:%d/v1 (alias 'demo'), fake upstream on :18001",
            args.host,
            args.port,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await fake.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def cmd_kafka_init(args: argparse.Namespace) -> int:
    from proxy.kafka import kafka_init

    config = load_config(config_path_from_env(args.config))
    bootstrap = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print("llm-proxy: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap", file=sys.stderr)
        return 2
    return asyncio.run(
        kafka_init(
            bootstrap,
            args.topic or config.events.topic,
            args.partitions or config.events.partitions,
            args.replication_factor or config.events.replication_factor,
        )
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config", help="YAML file (default: $LLM_PROXY_CONFIG or model_aliases.yaml)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=os.environ.get("LLM_PROXY_WORKERS", "1"),
        help="processes sharing the port via SO_REUSEPORT (default $LLM_PROXY_WORKERS or 1)",
    )
    serve.set_defaults(func=cmd_serve)

    fake = sub.add_parser("fake-upstream", help="run the OpenAI-compatible fake upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8001)
    fake.add_argument("--chunks", type=int, default=8, help="content chunks per streamed reply")
    fake.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    fake.add_argument("--first-byte-delay", type=float, default=0.0)
    fake.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    fake.set_defaults(func=cmd_fake_upstream)

    demo = sub.add_parser("demo", help="offline demo: proxy + fake upstream, no services needed")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--delay", type=float, default=0.05, help="seconds between chunks")
    demo.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    demo.set_defaults(func=cmd_demo)

    kinit = sub.add_parser("kafka-init", help="create the charge-event topic")
    kinit.add_argument("--config")
    kinit.add_argument("--bootstrap")
    kinit.add_argument("--topic")
    kinit.add_argument("--partitions", type=int)
    kinit.add_argument("--replication-factor", type=int)
    kinit.set_defaults(func=cmd_kafka_init)

    register_ledger_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
