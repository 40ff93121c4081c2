"""The official openai SDK through the proxy sees what it sees calling upstream directly."""

from __future__ import annotations

import openai

from tests.fixtures_proxy import PROVIDER_KEY, SERVICE_KEY, StartProxy

MESSAGES = [{"role": "user", "content": "Say something deterministic."}]


def _clients(h) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    via_proxy = openai.AsyncOpenAI(
        base_url=f"{h.url}/v1",
        api_key=SERVICE_KEY,
        max_retries=0,
        default_headers={"X-User-Id": "7"},
    )
    direct = openai.AsyncOpenAI(base_url=h.upstream_url, api_key=PROVIDER_KEY, max_retries=0)
    return via_proxy, direct


async def test_non_streaming_matches_direct_call(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    via_proxy, direct = _clients(h)
    got = await via_proxy.chat.completions.create(model="smart", messages=MESSAGES)
    # The proxy rewrote the alias; call upstream with the upstream model name.
    want = await direct.chat.completions.create(model="fake-model-v1", messages=MESSAGES)
    assert got.id == want.id
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].finish_reason == want.choices[0].finish_reason == "stop"
    assert got.usage == want.usage
    seen = h.recorder.requests[0]
    assert seen["body"]["model"] == "fake-model-v1"
    assert seen["headers"]["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert SERVICE_KEY not in str(seen["headers"])
    await via_proxy.close()
    await direct.close()


async def test_streaming_matches_direct_call(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    via_proxy, direct = _clients(h)
    got = [
        c
        async for c in await via_proxy.chat.completions.create(
            model="smart", messages=MESSAGES, stream=True
        )
    ]
    want = [
        c
        async for c in await direct.chat.completions.create(
            model="fake-model-v1", messages=MESSAGES, stream=True
        )
    ]
    assert [c.id for c in got] == [c.id for c in want]
    assert "".join(c.choices[0].delta.content or "" for c in got) == "".join(
        c.choices[0].delta.content or "" for c in want
    )
    assert [c.choices[0].finish_reason for c in got] == [c.choices[0].finish_reason for c in want]
    # The caller did not ask for usage: no usage chunk, although the proxy asked upstream.
    assert all(c.usage is None for c in got)
    assert h.recorder.requests[0]["body"]["stream_options"] == {"include_usage": True}
    assert h.recorder.requests[0]["headers"]["Authorization"] == f"Bearer {PROVIDER_KEY}"
    await via_proxy.close()
    await direct.close()


async def test_streaming_with_usage_requested_passes_usage_through(start_proxy: StartProxy) -> None:
    h = await start_proxy()
    via_proxy, direct = _clients(h)
    got = [
        c
        async for c in await via_proxy.chat.completions.create(
            model="smart", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    ]
    want = [
        c
        async for c in await direct.chat.completions.create(
            model="fake-model-v1",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    assert got[-1].usage is not None
    assert got[-1].usage == want[-1].usage
    await via_proxy.close()
    await direct.close()
