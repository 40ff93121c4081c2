"""The proxy under test, in front of the fake upstream (pytest plugin).

`start_proxy(...)` builds a config from a small YAML template pointing at a fake
upstream on a free port, starts both as real TCP servers on 127.0.0.1 and returns
a `ProxyHarness`. Redis, Kafka and the snapshot provider are opt-in per test.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.billing.encodings import EncodingRegistry
from proxy.config import EnvSettings, YamlConfig, parse_config
from proxy.config.yaml_loader import load_yaml
from proxy.contract.outcome import Outcome
from proxy.contract.usage import Usage, UsageSource
from proxy.devtools.fake_upstream import BEHAVIOUR, RECORDER, Behaviour, Recorder, build_fake_app
from proxy.server.app import build_app
from proxy.server.lifecycle import EmbeddedLedgerFactory
from proxy.server.state import STATE, ProxyState
from proxy.telemetry.observer import Observer

if TYPE_CHECKING:
    from proxy.billing.record import Exchange
    from proxy.billing.settlement import Settlement

PROVIDER_KEY = "sk-provider-secret-for-tests"
SERVICE_KEY = "sk-service-key-for-tests"

BASE_YAML = """
providers:
  fake:
    base_url: {base_url}
    api_key_env: FAKE_PROVIDER_KEY
    stream_usage: {stream_usage}
    timeouts: {{connect: 1, first_byte: {first_byte}, idle: {idle}, total: {total}}}
price_rules:
  std: {{input: 1000, cached_input: 500, output: 2000}}
  premium: {{input: 10000000, output: 10000000}}   # 10 credits per token
aliases:
  # x_fault: the fake upstream's per-request fault picker, a field only it reads.
  smart: {{provider: fake, model: fake-model-v1, price_rule: std, tokenizer: o200k_base,
          allow_params: [x_fault]}}
  legacy: {{provider: fake, model: fake-model-old, price_rule: std, tokenizer: cl100k_base}}
  freebie: {{provider: fake, model: fake-model-free, free: true}}
  premium: {{provider: fake, model: fake-model-pro, price_rule: premium}}
"""


@dataclass
class ProxyHarness:
    url: str  # http://127.0.0.1:PORT (the proxy)
    upstream_url: str  # http://127.0.0.1:PORT/v1 (the fake upstream, for direct calls)
    session: aiohttp.ClientSession
    proxy_app: web.Application
    fake_app: web.Application
    config: YamlConfig
    settings: EnvSettings
    fake_server: TestServer | None = None

    @property
    def behaviour(self) -> Behaviour:
        return self.fake_app[BEHAVIOUR]

    @property
    def recorder(self) -> Recorder:
        return self.fake_app[RECORDER]

    @property
    def state(self) -> ProxyState:
        return self.proxy_app[STATE]

    def headers(self, user_id: int | None = 7, **extra: str) -> dict[str, str]:
        h = {"Authorization": f"Bearer {SERVICE_KEY}"}
        if user_id is not None:
            h["X-User-Id"] = str(user_id)
        h.update(extra)
        return h

    async def chat(
        self, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any] | bytes, Any]:
        """POST a chat request; returns (status, parsed JSON or raw SSE bytes, headers)."""
        async with self.session.post(
            f"{self.url}/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json", **(headers or self.headers())},
        ) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, orjson.loads(raw), resp.headers
            return resp.status, raw, resp.headers

    def sink_events(self) -> list[dict[str, Any]]:
        path = Path(self.settings.sink_path)
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]

    async def wait_events(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least `n` charge events reached the sink (requests whose
        client went away settle asynchronously), then return them all."""
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            events = self.sink_events()
            if len(events) >= n or loop.time() > deadline:
                return events
            await asyncio.sleep(0.01)

    async def flush_events(self) -> None:
        """Wait until the outbox handed everything to the sink/Kafka."""
        import asyncio

        for _ in range(500):
            outbox = self.state.outbox
            if outbox.pending_count() == 0 and outbox.queued_count() == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("outbox did not drain")

    async def stop_upstream(self) -> None:
        """Shut the fake upstream down: its port then refuses connections."""
        if self.fake_server is not None:
            await self.fake_server.close()


def service_key_yaml(scenes: str = '["*"]', *, may_skip_charge: bool = True) -> str:
    from proxy.contract.redis_keys import key_sha256 as hash_key

    return textwrap.dedent(
        f"""
        auth:
          mode: keys
          user_key_cache_ttl_s: 1
          service_keys:
            - name: test-service
              sha256: "{hash_key(SERVICE_KEY)}"
              scenes: {scenes}
              may_skip_charge: {str(may_skip_charge).lower()}
        """
    )


@dataclass(frozen=True, slots=True)
class Finished:
    """What the proxy recorded about one finished request (see RecordingObserver)."""

    request_id: str
    outcome: Outcome | None
    status: int
    error_kind: str | None
    usage: Usage | None
    usage_source: UsageSource | None
    event_id: str | None  # the charge event's id; None when nothing was charged
    guard: str | None  # the guard's decision; None when the request never got that far


class RecordingObserver(Observer):
    """Keeps what the proxy recorded about every finished request, for tests to assert on."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[Finished] = []

    def request_finished(
        self, ex: Exchange, settlement: Settlement | None, now: float, done: float
    ) -> None:
        super().request_finished(ex, settlement, now, done)
        event = settlement.event if settlement is not None else None
        self.finished.append(
            Finished(
                request_id=ex.request_id,
                outcome=ex.outcome,
                status=ex.status,
                error_kind=ex.error_kind,
                usage=ex.metered.usage if ex.metered is not None else None,
                usage_source=ex.metered.source if ex.metered is not None else None,
                event_id=event.event_id if event is not None else None,
                guard=ex.guard_decision,
            )
        )

    def by_request(self, request_id: str) -> Finished:
        matches = [f for f in self.finished if f.request_id == request_id]
        assert len(matches) == 1, f"{request_id!r} finished {len(matches)} times"
        return matches[0]


StartProxy = Callable[..., Awaitable[ProxyHarness]]


@dataclass
class FakeUpstream:
    """One more fake upstream (several targets per alias): `provider_yaml` is its
    `providers:` entry for `start_proxy(extra_providers=...)`."""

    name: str
    url: str
    app: web.Application
    server: TestServer

    @property
    def behaviour(self) -> Behaviour:
        return self.app[BEHAVIOUR]

    @property
    def recorder(self) -> Recorder:
        return self.app[RECORDER]

    def provider_yaml(self, first_byte: float = 5) -> str:
        return (
            f"  {self.name}: {{base_url: {self.url}, api_key_env: FAKE_PROVIDER_KEY,"
            f" timeouts: {{connect: 1, first_byte: {first_byte}, idle: 5, total: 30}}}}\n"
        )

    async def stop(self) -> None:
        await self.server.close()


StartFake = Callable[..., Awaitable[FakeUpstream]]


@pytest.fixture
async def start_fake() -> AsyncIterator[StartFake]:
    servers: list[TestServer] = []

    async def start(name: str, behaviour: Behaviour | None = None) -> FakeUpstream:
        app = build_fake_app(behaviour)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return FakeUpstream(name, f"http://127.0.0.1:{server.port}/v1", app, server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture(scope="session")
def shared_encodings() -> EncodingRegistry:
    """One registry for every proxy the tests start: loading o200k costs ~80 MB and
    a noticeable fraction of a second per app otherwise."""
    return EncodingRegistry()


@pytest.fixture
async def start_proxy(
    tmp_path: Path, shared_encodings: EncodingRegistry
) -> AsyncIterator[StartProxy]:
    servers: list[TestServer] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        *,
        behaviour: Behaviour | None = None,
        extra_yaml: str = "",
        extra_rules: str = "",
        extra_aliases: str = "",
        extra_providers: str = "",
        auth_yaml: str | None = None,
        stream_usage: bool = True,
        first_byte: float = 5,
        idle: float = 5,
        total: float = 30,
        redis_url: str | None = None,
        kafka_bootstrap: str | None = None,
        credit_snapshot_url: str | None = None,
        topic: str | None = None,
        guard_prefix: str | None = None,
        guard: dict[str, Any] | None = None,
        settings_overrides: dict[str, Any] | None = None,
        observer: Observer | None = None,
        embedded_ledger: EmbeddedLedgerFactory | None = None,
    ) -> ProxyHarness:
        fake_app = build_fake_app(behaviour)
        fake = TestServer(fake_app, host="127.0.0.1")
        await fake.start_server()
        servers.append(fake)
        upstream_url = f"http://127.0.0.1:{fake.port}/v1"
        text = BASE_YAML.format(
            base_url=upstream_url,
            stream_usage=str(stream_usage).lower(),
            first_byte=first_byte,
            idle=idle,
            total=total,
        )
        # Extra rules go under price_rules:, extra aliases under aliases: (the last
        # section of BASE_YAML); each line indented by two spaces.
        text = text.replace("\naliases:\n", "\n" + extra_rules + "aliases:\n", 1) + extra_aliases
        # Extra providers go under providers: (before price_rules:), two-space indented.
        text = text.replace("\nprice_rules:\n", "\n" + extra_providers + "price_rules:\n", 1)
        text += auth_yaml if auth_yaml is not None else service_key_yaml()
        # `guard`: more guard keys, e.g. {"mode": "check"}, {"hold_ttl_s": 1}.
        guard_keys = {
            **({"prefix": guard_prefix} if guard_prefix is not None else {}),
            **(guard or {}),
        }
        if guard_keys:
            text += "\nguard:\n" + "".join(
                f"  {k}: {orjson.dumps(v).decode()}\n" for k, v in guard_keys.items()
            )
        if topic is not None:
            text += f"\nevents:\n  topic: {topic}\n"
        text += extra_yaml
        config = parse_config(load_yaml(text), "test.yaml", {"FAKE_PROVIDER_KEY": PROVIDER_KEY})
        settings = EnvSettings(
            redis_url=redis_url,
            kafka_bootstrap=kafka_bootstrap,
            kafka_idempotent=False,  # the test broker's in-memory store rejects idempotence
            credit_snapshot_url=credit_snapshot_url,
            outbox_path=str(tmp_path / f"outbox-{len(servers)}.sqlite3"),
            sink_path=str(tmp_path / f"events-{len(servers)}.jsonl"),
            **(settings_overrides or {}),
        )
        proxy_app = build_app(
            config,
            settings,
            observer=observer,
            encodings=shared_encodings,
            embedded_ledger=embedded_ledger,
        )
        server = TestServer(proxy_app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return ProxyHarness(
            url=f"http://127.0.0.1:{server.port}",
            upstream_url=upstream_url,
            session=session,
            proxy_app=proxy_app,
            fake_app=fake_app,
            config=config,
            settings=settings,
            fake_server=fake,
        )

    yield start
    for session in sessions:
        await session.close()
    for server in reversed(servers):
        await server.close()
