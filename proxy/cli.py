"""llm-proxy: an OpenAI-compatible LLM reverse proxy with credit billing.

Point any OpenAI SDK's base_url at `llm-proxy serve`; every call is authenticated,
admitted against the payer's credit, relayed, metered, priced and charged exactly once.
`llm-proxy demo` runs the whole thing offline. Configuration: the YAML file
(--config / $LLM_PROXY_CONFIG / ./model_aliases.yaml) and the environment (README).
"""

# The one entry point: no business logic here, each command wires modules together;
# the ledger's commands live in proxy.ledger.cli. Every error leaves as one line:
# exit 2 for usage and configuration errors, 1 for runtime failures.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, NoReturn, cast

from aiohttp import web
from aiokafka.errors import KafkaError

from proxy import __version__
from proxy.config import EnvSettings, YamlConfig, load_config, parse_config
from proxy.config.env import LOG_LEVELS
from proxy.errors import ConfigError, StartupError
from proxy.ledger import cli as ledger_cli
from proxy.ledger.cli_common import positive_int
from proxy.logs import setup_logging
from proxy.rerate_cli import register_rerate
from proxy.server.options import LOOP_CHOICES, ServeOptions

if TYPE_CHECKING:
    from proxy.server.lifecycle import EmbeddedLedgerFactory

log = logging.getLogger(__name__)


def _load_config(path: str) -> YamlConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ConfigError(f"configuration error: {exc}") from None


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
    from proxy.server.serve import install_event_loop, listen_failed

    install_event_loop(args.loop)
    behaviour = Behaviour(
        chunks=args.chunks, chunk_delay=args.delay, first_byte_delay=args.first_byte_delay
    )
    try:
        web.run_app(
            build_fake_app(behaviour),
            host=args.host,
            port=args.port,
            access_log=None,
            print=lambda msg: log.info("fake upstream: %s", msg.strip()),
            handler_cancellation=True,
        )
    except OSError as exc:
        raise listen_failed(args.host, args.port, exc) from None
    return 0


def cmd_demo(args: argparse.Namespace, settings: EnvSettings) -> int:
    """Proxy plus fake upstream in one process: the offline quick start."""
    import yaml

    from proxy.devtools.fake_upstream import Behaviour, build_fake_app
    from proxy.server.app import build_app
    from proxy.server.serve import install_event_loop, listen_failed

    demo_file = resources.files("proxy.devtools").joinpath("demo_aliases.yaml")
    demo_yaml = yaml.safe_load(demo_file.read_text(encoding="utf-8"))
    install_event_loop(args.loop)

    async def main() -> None:
        fake = web.AppRunner(
            build_fake_app(Behaviour(chunk_delay=args.delay)),
            access_log=None,
            handler_cancellation=True,
        )
        await fake.setup()
        # A port of its own each time, so several demos can run side by side.
        await web.TCPSite(fake, "127.0.0.1", 0).start()
        fake_port = int(fake.addresses[0][1])
        demo_yaml["providers"]["fake"]["base_url"] = f"http://127.0.0.1:{fake_port}/v1"
        config = parse_config(demo_yaml, str(demo_file), {})
        runner = web.AppRunner(
            build_app(config, settings, embedded_ledger=_embedded_ledger(settings)),
            access_log=None,
            handler_cancellation=True,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, args.host, args.port).start()
            log.info(
                "demo proxy on http://%s:%d/v1 (alias 'demo'), fake upstream on :%d",
                args.host,
                args.port,
                fake_port,
            )
            await asyncio.Event().wait()
        except OSError as exc:
            raise listen_failed(args.host, args.port, exc) from None
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


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}")
    return value


class CliParser(argparse.ArgumentParser):
    """argparse with one-line errors: `llm-proxy credits grant: error: ... (see --help)`.

    Sub-command parsers are made by their parent's class, so every level answers
    alike; a missing sub-command names the choices instead of an internal dest."""

    def error(self, message: str) -> NoReturn:
        if "the following arguments are required: COMMAND" in message:
            choices = [
                name
                for action in self._actions
                if isinstance(action, argparse._SubParsersAction)
                for name in action.choices
            ]
            message = f"a command is required: {', '.join(choices)}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(settings: EnvSettings) -> argparse.ArgumentParser:
    # --log-level is accepted before and after the sub-command (SUPPRESS: a sub-command
    # that is not given it keeps what the top level said).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help=f"log level (default: $LOG_LEVEL or info; now {settings.log_level})",
    )
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = CliParser(
        prog="llm-proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.set_defaults(log_level=settings.log_level)
    parser.add_argument("--version", action="version", version=f"llm-proxy {__version__}")
    # Typed as plain parsers: the sub-commands are registered by other modules.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )

    serve = sub.add_parser("serve", help="run the proxy", parents=[common], formatter_class=fmt)
    serve.add_argument(
        "--config", help="YAML file (default: $LLM_PROXY_CONFIG or model_aliases.yaml)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=8080, help="port to listen on")
    serve.add_argument(
        "--loop", choices=LOOP_CHOICES, default="auto", help="event loop (auto: uvloop if there)"
    )
    serve.add_argument(
        "--workers",
        type=positive_int,
        default=settings.workers,
        help="processes sharing the port via SO_REUSEPORT ($LLM_PROXY_WORKERS)",
    )
    serve.set_defaults(func=cmd_serve)

    fake = sub.add_parser(
        "fake-upstream",
        help="run the OpenAI-compatible fake upstream (development)",
        parents=[common],
        formatter_class=fmt,
    )
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on")
    fake.add_argument("--port", type=_port, default=8001, help="port to listen on")
    fake.add_argument("--chunks", type=int, default=8, help="content chunks per streamed reply")
    fake.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    fake.add_argument(
        "--first-byte-delay", type=float, default=0.0, help="seconds before the first byte"
    )
    fake.add_argument("--loop", choices=LOOP_CHOICES, default="auto", help="event loop")
    fake.set_defaults(func=cmd_fake_upstream)

    demo = sub.add_parser(
        "demo",
        help="offline demo: proxy + fake upstream, no services needed",
        parents=[common],
        formatter_class=fmt,
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on")
    demo.add_argument("--port", type=_port, default=8080, help="port to listen on")
    demo.add_argument("--delay", type=float, default=0.05, help="seconds between chunks")
    demo.add_argument("--loop", choices=LOOP_CHOICES, default="auto", help="event loop")
    demo.set_defaults(func=cmd_demo)

    kinit = sub.add_parser(
        "kafka-init", help="create the charge-event topic", parents=[common], formatter_class=fmt
    )
    kinit.add_argument("--config", help="YAML file (events.topic, events.partitions)")
    kinit.add_argument("--bootstrap", help="Kafka bootstrap servers ($KAFKA_BOOTSTRAP_SERVERS)")
    kinit.add_argument("--topic", help="topic (default: events.topic of the config)")
    kinit.add_argument("--partitions", type=int, help="default: events.partitions")
    kinit.add_argument("--replication-factor", type=int, help="default: events.replication_factor")
    kinit.set_defaults(func=cmd_kafka_init)

    register_rerate(ledger_cli.register(sub, [common]))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = EnvSettings.from_env()
        args = build_parser(settings).parse_args(argv)
        setup_logging(args.log_level)
        return int(args.func(args, settings) or 0)
    except ConfigError as exc:
        print(f"llm-proxy: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"llm-proxy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
