"""The credit API under test (pytest plugin): a real aiohttp server on a migrated
ledger database (SQLite and PostgreSQL) with user keys in a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config.load import parse_auth
from proxy.config.store import parse_store
from proxy.contract.redis_keys import key_sha256
from proxy.ledger.apikeys import ApiKeyStore
from proxy.ledger.credit_api.app import CreditApiOptions, build_credit_app
from tests.fixtures_redis import RedisServer

SERVICE_KEY = "sk-credit-service-key-for-tests"
WEBHOOK_SECRET = "whsec-test-secret"

PACKAGES = [
    {"id": "starter", "name": "Starter", "credits": 5000, "price": "1.99", "original_price": 2.99},
    {"id": "pro", "name": "Pro", "credits": 50000, "price": 9, "currency": "EUR"},
]
REWARDS = [
    {"id": "signup", "credits": 700, "once_per_user": True},
    {"id": "checkin", "credits": 30, "max_per_day": 2},
    {"id": "lucky", "credits": 11, "max_per_day": 1},
]


@dataclass
class CreditApi:
    url: str
    session: aiohttp.ClientSession
    engine: AsyncEngine
    keys: ApiKeyStore
    redis: Redis
    prefix: str

    async def call(
        self,
        method: str,
        path: str,
        key: str | None = None,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        body = data if data is not None else (orjson.dumps(json) if json is not None else None)
        async with self.session.request(method, self.url + path, data=body, headers=h) as resp:
            raw = await resp.read()
            return resp.status, orjson.loads(raw) if raw else None

    async def user_key(self, user_id: int) -> str:
        return (await self.keys.create(user_id)).api_key

    def as_service(self, user_id: int | None = None) -> dict[str, str]:
        return {} if user_id is None else {"X-User-Id": str(user_id)}


StartCreditApi = Callable[..., Awaitable[CreditApi]]


@pytest.fixture
async def start_credit_api(
    ledger_engine: AsyncEngine,
    ledger_url: str,
    redis_server: RedisServer,
    redis_client: Redis,
    redis_prefix: str,
) -> AsyncIterator[StartCreditApi]:
    servers: list[TestServer] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(**overrides: Any) -> CreditApi:
        auth = parse_auth(
            {
                "service_keys": [
                    {"name": "billing", "sha256": key_sha256(SERVICE_KEY), "scenes": ["*"]}
                ]
            }
        )
        fields: dict[str, Any] = {
            "database_url": ledger_url,
            "auth": auth,
            "store": parse_store(PACKAGES, REWARDS),
            "prefix": redis_prefix,
            "redis_url": redis_server.url,
            "webhook_secret": WEBHOOK_SECRET,
        }
        options = CreditApiOptions(**(fields | overrides))
        server = TestServer(build_credit_app(options), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return CreditApi(
            url=f"http://127.0.0.1:{server.port}",
            session=session,
            engine=ledger_engine,
            keys=ApiKeyStore(redis_client, prefix=redis_prefix),
            redis=redis_client,
            prefix=redis_prefix,
        )

    yield start
    for s in sessions:
        await s.close()
    for server in servers:
        await server.close()
