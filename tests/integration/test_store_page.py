"""The store page in headless Chromium (Debian's `chromium`, driven by Playwright's
Python API), end to end: N calls through the proxy (embedded ledger) -> the charge
events -> the ledger -> the credit API -> the numbers on the page.

Also: a wrong key shows the error, switching periods changes the numbers, "load
more" appends older rows, buying a package and simulating its payment raises the
balance, and the page fits a phone's width. Saves the screenshots
docs/store.png and docs/store-phone.png when STORE_SCREENSHOTS=docs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, async_playwright, expect
from redis.asyncio import Redis

from proxy.config import EnvSettings
from proxy.config.store import parse_store
from proxy.contract.charge_event import ChargeEvent
from proxy.contract.redis_keys import key_sha256
from proxy.delivery.outbox import OutboxRow
from proxy.ledger.book import Book, grant
from proxy.ledger.credit_api.app import CreditApiOptions, build_credit_app
from proxy.ledger.database import open_engine
from proxy.ledger.embedded import EmbeddedLedger, open_embedded_ledger
from tests.fixtures_proxy import StartProxy
from tests.ledger_events import charge_event

# Assertions wait up to this long for the page to show a state ("at all", not a latency
# claim): Playwright's 5 s default ran out on a slow CI box after the simulated payment.
expect.set_options(timeout=30_000)

# The README's screenshots are refreshed only on request (STORE_SCREENSHOTS=docs), so a
# test run never modifies the checkout; otherwise they go to a temporary directory.
DOCS = Path(__file__).resolve().parents[2] / "docs"


def shots_dir(tmp_path: Path) -> Path:
    return DOCS if os.environ.get("STORE_SCREENSHOTS") == "docs" else tmp_path


USER = 7
STORE_KEY = "sk-llmp-store-page-test-key"
HOUR_MS = 3_600_000
PACKAGES = [
    {"id": "starter", "name": "Starter", "credits": 5000, "price": "1.99",
     "original_price": "2.99"},
    {"id": "builder", "name": "Builder", "credits": 30000, "price": "9.99"},
    {"id": "team", "name": "Team", "credits": 200000, "price": "49.00", "original_price": "59.00"},
]  # fmt: skip


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed: apt-get install chromium (.ci/run does)"
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield b
        finally:
            await b.close()


class Tee:
    """The embedded ledger, keeping every charge event it was handed."""

    def __init__(self) -> None:
        self.events: dict[str, ChargeEvent] = {}

    async def __call__(
        self, settings: EnvSettings, prefix: str, redis: Redis | None
    ) -> EmbeddedLedger:
        ledger = await open_embedded_ledger(settings, prefix, redis)
        send = ledger.sink.send_batch

        async def send_batch(rows: Sequence[OutboxRow]) -> None:
            await send(rows)
            for row in rows:
                event = ChargeEvent.from_json(row.payload)
                self.events[event.event_id] = event

        ledger.sink.send_batch = send_batch  # type: ignore[method-assign]
        return ledger


def _number(text: str) -> int:
    digits = re.sub(r"[^0-9-]", "", text.replace("\u2212", "-"))
    return int(digits)


async def _api(session: aiohttp.ClientSession, url: str, path: str) -> dict:  # type: ignore[type-arg]
    async with session.get(url + path, headers={"Authorization": f"Bearer {STORE_KEY}"}) as r:
        assert r.status == 200, await r.text()
        return orjson.loads(await r.read())


async def _shown(page: Page, testid: str) -> int:
    return _number(await page.get_by_test_id(testid).inner_text())


async def test_store_page_end_to_end(
    start_proxy: StartProxy, tmp_path: Path, browser: Browser
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    tee = Tee()
    h = await start_proxy(settings_overrides={"ledger_database_url": url}, embedded_ledger=tee)
    engine = open_engine(url)  # migrated by the embedded ledger at start
    book = Book(engine)
    await grant(book, USER, 100_000, "welcome")
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    await book.apply_charges(  # older consumption, so the periods differ
        [
            charge_event(USER, 300, alias="smart", unix_ms=now_ms - 3 * 24 * HOUR_MS),
            charge_event(USER, 4000, alias="legacy", unix_ms=now_ms - 20 * 24 * HOUR_MS),
            charge_event(USER, 50000, alias="smart", unix_ms=now_ms - 60 * 24 * HOUR_MS),
        ]
    )

    n = 12
    for i in range(n):
        body = {"model": "smart", "messages": [{"role": "user", "content": f"question {i}"}]}
        status, _, _ = await h.chat(body, h.headers(user_id=USER))
        assert status == 200
    await h.flush_events()
    events = [e for e in tee.events.values() if e.user_id == USER]
    assert len(events) == n

    options = CreditApiOptions(
        database_url=url,
        auth=h.config.auth,
        store=parse_store(PACKAGES, None),
        prefix="store-test:",
        demo=True,
        static_keys={key_sha256(STORE_KEY): USER},
    )
    server = TestServer(build_credit_app(options), host="127.0.0.1")
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    session = aiohttp.ClientSession()
    context = await browser.new_context(viewport={"width": 1000, "height": 900})
    page = await context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("console", lambda msg: page_errors.append(msg.text) if msg.type == "error" else None)
    try:
        await page.goto(f"{base}/store")
        # A wrong key: the error element, and no data.
        await page.get_by_test_id("api-key").fill("sk-llmp-wrong")
        await page.get_by_test_id("sign-in").click()
        await expect(page.get_by_test_id("error")).to_be_visible()
        assert "Incorrect API key" in await page.get_by_test_id("error").inner_text()
        await expect(page.get_by_test_id("balance")).to_be_hidden()
        page_errors.clear()  # the 401 itself is logged by the browser

        await page.get_by_test_id("api-key").fill(STORE_KEY)
        await page.get_by_test_id("sign-in").click()
        await expect(page.get_by_test_id("error")).to_be_hidden()
        await expect(page.get_by_test_id("history-row").first).to_be_visible()

        balance = await _api(session, base, "/v1/credit/balance")
        assert await _shown(page, "balance") == balance["balance"]
        assert await _shown(page, "held") == balance["held"] == 0

        # 24h is exactly the proxy's calls: the charge events that produced it.
        await expect(page.get_by_test_id("period-24h")).to_have_class(re.compile("active"))
        assert await _shown(page, "usage-credits") == sum(e.credits for e in events)
        assert await _shown(page, "usage-tokens") == sum(
            e.usage.prompt_tokens + e.usage.completion_tokens for e in events
        )
        seen = {}
        for period in ("24h", "7d", "30d", "all"):
            await page.get_by_test_id(f"period-{period}").click()
            usage = await _api(session, base, f"/v1/credit/usage?period={period}")
            credits = page.get_by_test_id("usage-credits")
            await expect(credits).to_have_attribute("data-value", str(usage["credits"]))
            tokens = page.get_by_test_id("usage-tokens")
            await expect(tokens).to_have_attribute("data-value", str(usage["tokens"]["total"]))
            bars = page.locator("#chart rect")
            assert await bars.count() == len(usage["series"])
            seen[period] = usage["credits"]
        assert len(set(seen.values())) == 4, seen  # each period says something else

        # History: 10 rows, then "load more" appends the older ones.
        rows = page.get_by_test_id("history-row")
        assert await rows.count() == 10
        first_ids = [int(x) for x in await rows.evaluate_all("rs => rs.map(r => r.dataset.entry)")]
        await page.get_by_test_id("load-more").click()
        await expect(rows).to_have_count(n + 3 + 1)
        all_ids = [int(x) for x in await rows.evaluate_all("rs => rs.map(r => r.dataset.entry)")]
        assert all_ids[:10] == first_ids and all_ids == sorted(all_ids, reverse=True)
        await expect(page.get_by_test_id("load-more")).to_be_hidden()

        # Packages: the original price struck through where it differs.
        packages = page.get_by_test_id("package")
        assert await packages.count() == 3
        assert await packages.nth(0).locator("s").inner_text() == "2.99"
        assert await packages.nth(1).locator("s").count() == 0

        await page.get_by_test_id("period-30d").click()
        await expect(page.get_by_test_id("usage-credits")).to_have_attribute(
            "data-value", str(seen["30d"])
        )
        await page.screenshot(path=str(shots_dir(tmp_path) / "store.png"), full_page=True)

        # Buy + simulate payment: the balance goes up by the package's credits.
        before = await _shown(page, "balance")
        await page.get_by_test_id("buy").nth(0).click()
        await page.get_by_test_id("simulate-payment").first.click()
        await expect(page.get_by_test_id("balance")).to_have_attribute(
            "data-value", str(before + 5000)
        )
        assert (await _api(session, base, "/v1/credit/balance"))["balance"] == before + 5000
        await expect(page.get_by_test_id("history-row").first).to_contain_text("Bought starter")

        # Readable on a phone: nothing wider than the screen.
        await page.set_viewport_size({"width": 375, "height": 800})
        width = await page.evaluate("document.documentElement.scrollWidth")
        wide = await page.evaluate(
            "[...document.querySelectorAll('body *')].filter(e => "
            "e.getBoundingClientRect().right > 376).map(e => e.tagName + '.' + e.className + "
            "'#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right))"
        )
        assert width <= 375, wide
        await page.get_by_test_id("period-24h").click()
        await expect(page.get_by_test_id("usage-credits")).to_have_attribute(
            "data-value", str(seen["24h"])
        )
        await page.screenshot(path=str(shots_dir(tmp_path) / "store-phone.png"))
        assert not page_errors, page_errors
    finally:
        await context.close()
        await session.close()
        await server.close()
        await engine.dispose()
