"""`llm-proxy`: the one entry point. No business logic here: each command wires
modules together; the ledger's commands live in proxy.ledger.cli."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web
from aiokafka.errors import KafkaError

from proxy.config import EnvSettings, YamlConfig, load_config
from proxy.errors import ConfigError
from proxy.ledger.cli import register as register_ledger_commands
from proxy.logs import setup_logging
from proxy.server.options import LOOP_CHOICES, ServeOptions

if TYPE_CHECKING:
    from proxy.server.lifecycle import EmbeddedLedgerFactory

log = logging.getLogger(__name__)


def _load_config(path: str) -> YamlConfig | None:
    """The validated config, or None after telling why (the caller exits 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"llm-proxy: configuration error: {exc}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace, settings: EnvSettings) -> int:
    options = ServeOptions(
        config_path=settings.config_file(args.config),
        host=args.host,
        port=args.port,
        loop=args.loop,
        log_level=args.log_level,
        workers=args.workers,
    )
    config = _load_config(options.config_path)
    if config is None:
        return 2
    embedded = _embedded_ledger(settings)
    if options.workers > 1:
        from proxy.server.workers import run_workers

        # Workers get the grace period plus the outbox drain before being killed.
        grace = config.server.shutdown_grace_s + config.server.outbox_drain_s + 5
        return run_workers(options, settings, stop_timeout_s=grace, embedded_ledger=embedded)
    from proxy.server.serve import serve_one

    return serve_one(options, config, settings, embedded_ledger=embedded)


def _embedded_ledger(settings: EnvSettings) -> EmbeddedLedgerFactory | None:
    """Without Kafka, charge events go to the embedded ledger (unless turned off)."""
    if settings.kafka_bootstrap or not settings.embedded_ledger:
        return None
    from proxy.ledger.embedded import open_embedded_ledger

    return open_embedded_ledger


def cmd_fake_upstream(args: argparse.Namespace, settings: EnvSettings) -> int:
    from proxy.devtools.fake_upstream import Behaviour, build_fake_app
    from proxy.server.serve import install_event_loop

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


def cmd_demo(args: argparse.Namespace, settings: EnvSettings) -> int:
    """Proxy plus fake upstream in one process: the offline quick start."""
    from proxy.devtools.fake_upstream import Behaviour, build_fake_app
    from proxy.server.app import build_app
    from proxy.server.serve import install_event_loop

    demo_file = resources.files("proxy.devtools").joinpath("demo_aliases.yaml")
    with resources.as_file(demo_file) as path:
        config = load_config(path)
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
            build_app(config, settings, embedded_ledger=_embedded_ledger(settings)),
            access_log=None,
            handler_cancellation=True,
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


def cmd_kafka_init(args: argparse.Namespace, settings: EnvSettings) -> int:
    """Create the events topic. Exit 0 when the topic exists afterwards, 1 when the
    broker failed, 2 for bad arguments."""
    from proxy.delivery.kafka import create_topic

    config = _load_config(settings.config_file(args.config))
    if config is None:
        return 2
    bootstrap = args.bootstrap or settings.kafka_bootstrap
    if not bootstrap:
        print("llm-proxy: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap", file=sys.stderr)
        return 2
    topic = args.topic or config.events.topic
    e = config.events
    partitions = e.partitions if args.partitions is None else args.partitions
    replication = args.replication_factor
    if replication is None:
        replication = e.replication_factor
    if not topic or partitions < 1 or replication < 1:
        print("kafka-init: need a topic name, partitions >= 1, replication >= 1", file=sys.stderr)
        return 2
    try:
        created = asyncio.run(create_topic(bootstrap, topic, partitions, replication))
    except (KafkaError, OSError) as exc:
        print(f"kafka-init: cannot create topic {topic!r} on {bootstrap}: {exc}", file=sys.stderr)
        return 1
    if created:
        print(
            f"kafka-init: created topic {topic!r} on {bootstrap} "
            f"(partitions={partitions}, replication={replication})"
        )
    else:
        print(f"kafka-init: topic {topic!r} already exists on {bootstrap}; nothing to do")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def build_parser(settings: EnvSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description=__doc__)
    parser.add_argument("--log-level", default=settings.log_level)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config", help="YAML file (default: $LLM_PROXY_CONFIG or model_aliases.yaml)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--loop", choices=LOOP_CHOICES, default="auto")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=settings.workers,
        help="processes sharing the port via SO_REUSEPORT (default $LLM_PROXY_WORKERS or 1)",
    )
    serve.set_defaults(func=cmd_serve)

    fake = sub.add_parser("fake-upstream", help="run the OpenAI-compatible fake upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8001)
    fake.add_argument("--chunks", type=int, default=8, help="content chunks per streamed reply")
    fake.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    fake.add_argument("--first-byte-delay", type=float, default=0.0)
    fake.add_argument("--loop", choices=LOOP_CHOICES, default="auto")
    fake.set_defaults(func=cmd_fake_upstream)

    demo = sub.add_parser("demo", help="offline demo: proxy + fake upstream, no services needed")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--delay", type=float, default=0.05, help="seconds between chunks")
    demo.add_argument("--loop", choices=LOOP_CHOICES, default="auto")
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
    try:
        settings = EnvSettings.from_env()
    except ConfigError as exc:
        print(f"llm-proxy: {exc}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    setup_logging(args.log_level)
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
