"""Golden provider replies (tests/data/providers): the usage read from each, in both
stream modes and however the reads are split, and what the caller is sent."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
import tiktoken

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.metering import meter_json
from proxy.contract.usage import Usage, UsageSource
from proxy.upstream import sse
from proxy.upstream.stream_meter import StreamMeter, meter_stream

DATA = Path(__file__).parents[1] / "data" / "providers"
EXPECTED = orjson.loads((DATA / "expected.json").read_bytes())
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
STREAMS = sorted(n for n in EXPECTED if n.endswith(".sse"))
BODIES = sorted(n for n in EXPECTED if n.endswith(".json"))


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return EncodingRegistry().get("o200k_base")


def splits(data: bytes, seed: int) -> list[bytes]:
    if seed == 0:
        return [data]
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 60)
        out.append(data[i : i + n])
        i += n
    return out


def test_every_fixture_has_an_expectation() -> None:
    files = {p.name for p in DATA.iterdir() if p.suffix in (".sse", ".json")}
    assert files - {"expected.json"} == set(EXPECTED) - {"_about"}


@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_stream_usage_is_read_from_every_dialect(
    enc: tiktoken.Encoding, name: str, strip: bool, seed: int
) -> None:
    body = (DATA / name).read_bytes()
    meter = StreamMeter(strip_usage=strip)
    out = b"".join(meter.relay(p) for p in splits(body, seed)) + meter.unterminated()
    metered = meter_stream(meter, REQUEST, enc)
    assert metered.source is UsageSource.UPSTREAM, name
    assert metered.usage == Usage(*EXPECTED[name])
    if not strip:
        assert out == body  # pass-through is byte-identical
        return
    # The caller did not ask for usage: it gets none of the `usage` members we asked
    # for (a provider's own x_groq or in-choice report is what it would get anyway),
    # and every choice it would have got.
    objects = list(sse.iter_event_objects(out))
    assert all("usage" not in obj for obj in objects)
    sent = [o for o in sse.iter_event_objects(body) if o.get("choices")]
    assert [o.get("choices") for o in objects if o.get("choices")] == [o["choices"] for o in sent]
    assert out.endswith(b"data: [DONE]" + body[body.rindex(b"[DONE]") + 6 :])


@pytest.mark.parametrize("name", BODIES)
def test_json_usage_is_read_from_every_dialect(enc: tiktoken.Encoding, name: str) -> None:
    metered = meter_json((DATA / name).read_bytes(), REQUEST, enc)
    assert metered.source is UsageSource.UPSTREAM, name
    assert metered.usage == Usage(*EXPECTED[name])


def test_usage_on_a_chunk_with_choices_is_cut_out_of_that_chunk_only() -> None:
    body = (DATA / "litellm.sse").read_bytes()
    meter = StreamMeter(strip_usage=True)
    out = meter.relay(body)
    last = [o for o in sse.iter_event_objects(out)][-1]
    assert last["choices"] == [{"finish_reason": "stop", "index": 0, "delta": {}}]
    assert "usage" not in last and last["id"] == "chatcmpl-l6"
