"""The official openai SDK's Responses, embeddings and legacy completions calls
through the proxy: drop-in, and each one charged once with its endpoint."""

from __future__ import annotations

import asyncio

import openai

from proxy.devtools.fake_upstream import Behaviour
from tests.fixtures_proxy import PROVIDER_KEY, SERVICE_KEY, ProxyHarness, StartProxy
from tests.integration.test_endpoints_proxy import ALIASES, PROVIDERS


def clients(h: ProxyHarness) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    via_proxy = openai.AsyncOpenAI(
        base_url=f"{h.url}/v1",
        api_key=SERVICE_KEY,
        max_retries=0,
        default_headers={"X-User-Id": "7"},
    )
    direct = openai.AsyncOpenAI(base_url=h.upstream_url, api_key=PROVIDER_KEY, max_retries=0)
    return via_proxy, direct


async def start(start_proxy: StartProxy, **kw) -> ProxyHarness:
    return await start_proxy(extra_providers=PROVIDERS, extra_aliases=ALIASES, **kw)


async def events(h: ProxyHarness, n: int) -> list[dict]:
    got = await h.wait_events(n)
    await asyncio.sleep(0.05)
    assert len(h.sink_events()) == n
    return got


async def test_responses_stream_with_the_sdk(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    via_proxy, direct = clients(h)
    stream = await via_proxy.responses.create(
        model="multi", instructions="Be brief.", input="Count the figs.", stream=True
    )
    got = [e async for e in stream]
    want = [
        e
        async for e in await direct.responses.create(
            model="fake-multi", instructions="Be brief.", input="Count the figs.", stream=True
        )
    ]
    assert [e.type for e in got] == [e.type for e in want]
    assert got[0].type == "response.created" and got[-1].type == "response.completed"
    text = "".join(e.delta for e in got if e.type == "response.output_text.delta")
    assert text and got[-1].response.output_text == text
    usage = got[-1].response.usage
    (event,) = await events(h, 1)
    assert event["endpoint"] == "responses" and event["usage_source"] == "upstream"
    assert event["usage"]["prompt"] == usage.input_tokens
    assert event["usage"]["completion"] == usage.output_tokens
    # The stored response, through the proxy (the alias named with extra_query).
    fetched = await via_proxy.responses.retrieve(
        got[-1].response.id, extra_query={"model": "multi"}
    )
    assert fetched.output_text == text
    await via_proxy.close()
    await direct.close()


async def test_responses_non_stream_with_the_sdk(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    via_proxy, _ = clients(h)
    got = await via_proxy.responses.create(model="multi", input="hello")
    assert got.output_text and got.usage is not None
    (event,) = await events(h, 1)
    assert event["usage"]["prompt"] == got.usage.input_tokens
    await via_proxy.close()


async def test_embeddings_with_the_sdk(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    via_proxy, direct = clients(h)
    # The SDK asks for base64 by default and decodes it; dimensions pass through.
    got = await via_proxy.embeddings.create(model="embed", input=["a", "b c"], dimensions=6)
    want = await direct.embeddings.create(model="fake-embed", input=["a", "b c"], dimensions=6)
    assert [d.embedding for d in got.data] == [d.embedding for d in want.data]
    assert len(got.data[0].embedding) == 6
    assert h.recorder.requests[0]["body"]["encoding_format"] == "base64"
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    raw = await via_proxy.embeddings.create(model="embed", input=[1, 2, 3], encoding_format="float")
    assert isinstance(raw.data[0].embedding[0], float)
    first, second = await events(h, 2)
    assert first["endpoint"] == second["endpoint"] == "embeddings"
    assert first["usage"]["prompt"] == got.usage.prompt_tokens
    assert second["usage"]["prompt"] == 3 and second["usage"]["completion"] == 0
    await via_proxy.close()
    await direct.close()


async def test_completions_with_the_sdk(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(chunks=5))
    via_proxy, direct = clients(h)
    got = await via_proxy.completions.create(model="multi", prompt="Once upon", max_tokens=5)
    want = await direct.completions.create(model="fake-multi", prompt="Once upon", max_tokens=5)
    assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
    chunks = [
        c
        async for c in await via_proxy.completions.create(
            model="multi", prompt="Once upon", stream=True
        )
    ]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == got.choices[0].text
    assert all(c.usage is None for c in chunks)  # the usage the proxy asked for is removed
    first, second = await events(h, 2)
    assert first["endpoint"] == second["endpoint"] == "completions"
    assert second["stream"] is True and second["usage_source"] == "upstream"
    await via_proxy.close()
    await direct.close()
