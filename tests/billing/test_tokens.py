"""Offline encodings identical to tiktoken's, and OpenAI chat counting rules."""

from __future__ import annotations

import gzip
import json
import random
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public

from proxy.billing import encodings
from proxy.billing.encodings import (
    DEFAULT_ENCODING,
    SUPPORTED_ENCODINGS,
    EncodingLoadError,
    EncodingRegistry,
    encoding_spec,
    load_encoding,
    packaged_data_dir,
)
from proxy.billing.tokens import (
    IMAGE_PART_TOKENS,
    count_chat_prompt,
    count_completion,
    count_text,
    render_function_definitions,
)
from proxy.billing.tool_schema import unrendered_schema_text

EXAMPLES_FILE = Path(__file__).parents[1] / "data" / "chat_usage_examples.json"


@pytest.fixture(scope="module")
def registry() -> EncodingRegistry:
    reg = EncodingRegistry()
    reg.preload(SUPPORTED_ENCODINGS)
    return reg


def _packaged_tiktoken_bytes(name: str) -> bytes:
    return gzip.decompress(packaged_data_dir().joinpath(f"{name}.tiktoken.gz").read_bytes())


@pytest.fixture(scope="module")
def tiktoken_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tiktoken.Encoding]:
    """Encodings built entirely by tiktoken: its constructors (pat_str, special tokens,
    expected hash) and its own load_tiktoken_bpe reading a decompressed local copy.

    The constructors ask for an https URL; we redirect that to the local copy, and a
    fresh cache dir makes tiktoken verify the expected hash itself (an empty one would
    skip the check). Nothing is fetched.
    """
    files = tmp_path_factory.mktemp("tiktoken-files")
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name in SUPPORTED_ENCODINGS:
        (files / f"{name}.tiktoken").write_bytes(_packaged_tiktoken_bytes(name))
    real_load = tiktoken.load.load_tiktoken_bpe

    def load_local(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        assert expected_hash, "tiktoken's constructor must pin a hash"
        return real_load(str(files / url.rsplit("/", 1)[-1]), expected_hash=expected_hash)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(openai_public, "load_tiktoken_bpe", load_local)
        return {n: tiktoken.Encoding(**getattr(openai_public, n)()) for n in SUPPORTED_ENCODINGS}


@pytest.fixture(scope="module")
def rust_reference() -> dict[str, Any]:
    """The independent Rust implementation (bpe-openai), via its tiktoken-like API.

    Imported here, not at module level: importing it loads a vocabulary, and its
    loader uses a deprecated importlib.resources call that is not our concern.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "open_binary is deprecated", DeprecationWarning)
        import bpe_openai

        return {n: bpe_openai.get_encoding(n) for n in SUPPORTED_ENCODINGS}


# ------------------------------------------------------------------------- loading


def test_default_is_supported() -> None:
    assert DEFAULT_ENCODING == "o200k_base"
    assert set(SUPPORTED_ENCODINGS) == {"cl100k_base", "o200k_base"}


@pytest.mark.parametrize("name", SUPPORTED_ENCODINGS)
def test_spec_equals_tiktoken_constructor(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen["url"], seen["hash"] = url, expected_hash
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    ctor = getattr(openai_public, name)()
    spec = encoding_spec(name)
    assert seen["url"].endswith(f"/{name}.tiktoken")
    assert seen["hash"] == spec.sha256
    assert ctor["pat_str"] == spec.pat_str
    assert ctor["special_tokens"] == dict(spec.special_tokens)


def _write_gz(directory: Path, name: str, data: bytes) -> None:
    (directory / f"{name}.tiktoken.gz").write_bytes(gzip.compress(data))


def test_intact_copy_in_other_dir_loads(tmp_path: Path) -> None:
    _write_gz(tmp_path, "cl100k_base", _packaged_tiktoken_bytes("cl100k_base"))
    enc = load_encoding("cl100k_base", tmp_path)
    assert enc.name == "cl100k_base"
    assert enc.encode_ordinary("hello world") == [15339, 1917]


@pytest.mark.parametrize("name", SUPPORTED_ENCODINGS)
def test_corrupted_copy_is_rejected(tmp_path: Path, name: str) -> None:
    data = bytearray(_packaged_tiktoken_bytes(name))
    # Swap two ranks' digits in one line: still parses, but would miscount.
    line_end = data.index(b"\n", 5000)
    data[line_end - 1] = ord("0") if data[line_end - 1] != ord("0") else ord("1")
    _write_gz(tmp_path, name, bytes(data))
    with pytest.raises(EncodingLoadError, match=f"sha256 mismatch for {name}"):
        load_encoding(name, tmp_path)
    with pytest.raises(EncodingLoadError, match="sha256 mismatch"):
        EncodingRegistry(tmp_path).get(name)


def test_truncated_copy_is_rejected(tmp_path: Path) -> None:
    data = _packaged_tiktoken_bytes("cl100k_base")
    _write_gz(tmp_path, "cl100k_base", data[: len(data) // 2])
    with pytest.raises(EncodingLoadError, match="sha256 mismatch"):
        load_encoding("cl100k_base", tmp_path)


def test_not_gzip_missing_and_unknown_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "o200k_base.tiktoken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(EncodingLoadError, match="cannot read encoding file"):
        load_encoding("o200k_base", tmp_path)
    with pytest.raises(EncodingLoadError, match="cannot read encoding file"):
        load_encoding("cl100k_base", tmp_path)
    with pytest.raises(EncodingLoadError, match="unsupported encoding 'p50k_base'"):
        EncodingRegistry().get("p50k_base")


def test_registry_loads_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = encodings.load_encoding

    def counting_load(name: str, data_dir: Any = None) -> tiktoken.Encoding:
        calls.append(name)
        return real(name, data_dir)

    monkeypatch.setattr(encodings, "load_encoding", counting_load)
    reg = EncodingRegistry()
    assert calls == []
    start = threading.Barrier(8)
    results: list[tiktoken.Encoding] = []

    def worker() -> None:
        start.wait()
        results.append(reg.get("cl100k_base"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["cl100k_base"]
    assert len(results) == 8 and all(r is results[0] for r in results)
    reg.preload(["cl100k_base", "o200k_base"])
    assert calls == ["cl100k_base", "o200k_base"]


# -------------------------------------------------------------- token identity


# Published ids: cl100k "hello world" is tiktoken's README example; the rest are printed
# in openai-cookbook examples/How_to_count_tokens_with_tiktoken.ipynb.
PUBLISHED_IDS = [
    ("cl100k_base", "hello world", [15339, 1917]),
    ("cl100k_base", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
    ("o200k_base", "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
    ("cl100k_base", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
    ("o200k_base", "antidisestablishmentarianism", [493, 129901, 376, 160388, 21203, 2367]),
    ("cl100k_base", "2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
    ("o200k_base", "2 + 2 = 4", [17, 659, 220, 17, 314, 220, 19]),
    (
        "cl100k_base",
        "お誕生日おめでとう",
        [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699],
    ),
    ("o200k_base", "お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
]


@pytest.mark.parametrize(("name", "text", "ids"), PUBLISHED_IDS)
def test_published_token_ids(
    registry: EncodingRegistry, name: str, text: str, ids: list[int]
) -> None:
    assert registry.get(name).encode_ordinary(text) == ids
    assert count_text(registry.get(name), text) == len(ids)


def _corpus(seed: int = 20240611) -> list[str]:
    """≥ 1,000 varied strings, deterministic for a seed."""
    rng = random.Random(seed)
    pools = {
        "ascii": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        " .,;:!?'\"-_()[]{}<>/\\|@#$",
        "cjk": "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要"
        "于就下得可你年生自会",
        "kana": "あいうえおかきくけこさしすせそたちつてとなにぬねのアイウエオカキクケコ",
        "hangul": "가나다라마바사아자차카타파하한국어입니다",
        "emoji": "😀😃😄😁🤣😂🙂🙃😉😊👍🏽👨‍👩‍👧‍👦🏳️‍🌈❤️🔥✨🎉🚀🇺🇸🇯🇵",
        "combining": "e\u0301a\u0300o\u0308n\u0303\u0327\u0336\u20dd"
        "\u0e04\u0e31\u0e49\u0e33\u0915\u094d\u0937",
        "rtl": "مرحبا بالعالم שלום עולם \u200f\u202b\u202c سلام",
        "cyrillic_greek": "Привет мир ЁЖЗИЙ ёжзий Ελληνικά αβγδ",
        "space": " \t\n\r\u00a0\u2003\u3000\u200b\f\v",
        "digits": "0123456789\u0660\u0661\u0662\u0663\u0664\u0665\u096c\u096d\u096e\u096f",
        "punct": "!!??...,,;;::--__==++**&&||<<>>//\\\\",
    }
    specials = [
        "<|endoftext|>",
        "<|endofprompt|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|start|>",
        "<|message|>",
    ]
    out = [
        "",
        " ",
        "\n",
        "\r\n",
        "I'm you're we'll they'd it's I'VE HE'LL",
        "def f(x):\n    return x ** 2\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
        '<html><body class="x">Hi</body></html>\n\n\n',
        "const x = (a, b) => a?.b ?? c;  // comment   \n",
        "    \n\n    indented\n\t\ttabs\n   ",
    ]
    names = list(pools)
    for _ in range(700):  # mixed-script text with separators
        parts = []
        for _ in range(rng.randrange(1, 12)):
            pool = pools[rng.choice(names)]
            parts.append("".join(rng.choice(pool) for _ in range(rng.randrange(1, 12))))
            parts.append(rng.choice(["", " ", "  ", "\n", " \n ", "\t"]))
        out.append("".join(parts))
    for _ in range(100):  # whitespace runs between, before and after text
        ws = "".join(rng.choice(pools["space"]) for _ in range(rng.randrange(1, 40)))
        out.append(rng.choice(["", "a", "word", "x1"]) + ws + rng.choice(["", "b", "end", "9"]))
    for _ in range(60):  # long repeats
        unit = rng.choice(["a", "ab", " ", "\n", "ha", "😀", "的", "0", "-", "=", "abc ", " \n"])
        out.append(unit * rng.randrange(50, 3000))
    for _ in range(100):  # numbers
        out.append(
            rng.choice(
                [
                    str(rng.randrange(10 ** rng.randrange(1, 25))),
                    f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 9)}f}",
                    f"{rng.random():e}",
                    ",".join(str(rng.randrange(1000)) for _ in range(rng.randrange(2, 9))),
                    f"v{rng.randrange(10)}.{rng.randrange(100)}.{rng.randrange(1000)}",
                ]
            )
        )
    for _ in range(60):  # special-token-looking text
        words = [*specials, "text", "more", "\n", "<|", "|>"]
        out.append(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 8))))
    for _ in range(150):  # random bytes, decoded leniently
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        out.append(raw.decode("utf-8", errors="replace"))
    return out


CORPUS = _corpus()


def test_corpus_is_large_and_deterministic() -> None:
    assert len(set(CORPUS)) >= 1000
    assert _corpus() == CORPUS
    assert _corpus(seed=1) != CORPUS


@pytest.mark.parametrize("name", SUPPORTED_ENCODINGS)
def test_ids_identical_to_tiktoken_and_rust(
    registry: EncodingRegistry,
    tiktoken_reference: dict[str, tiktoken.Encoding],
    rust_reference: dict[str, Any],
    name: str,
) -> None:
    ours, ref, rust = registry.get(name), tiktoken_reference[name], rust_reference[name]
    for text in CORPUS:
        ids = ours.encode_ordinary(text)
        assert ids == ref.encode_ordinary(text), text
        assert ids == rust.encode_ordinary(text), text
        assert count_text(ours, text) == len(ids)
        assert ours.decode(ids) == text


@pytest.mark.parametrize("name", SUPPORTED_ENCODINGS)
def test_special_tokens_identical(
    registry: EncodingRegistry, tiktoken_reference: dict[str, tiktoken.Encoding], name: str
) -> None:
    ours, ref = registry.get(name), tiktoken_reference[name]
    assert ours.special_tokens_set == ref.special_tokens_set
    assert ours.n_vocab == ref.n_vocab
    for text in CORPUS:
        if "<|" in text:
            assert ours.encode(text, allowed_special="all") == ref.encode(
                text, allowed_special="all"
            )


def test_count_text_never_raises_on_special_or_surrogates(registry: EncodingRegistry) -> None:
    enc = registry.get("cl100k_base")
    # As plain text "<|endoftext|>" is 7 tokens; as the special token it would be 1.
    assert count_text(enc, "<|endoftext|>") == 7
    assert count_text(enc, "a\ud800b") == 3  # a lone surrogate (valid in JSON escapes)
    assert count_text(enc, "") == 0


# ---------------------------------------------------------- chat prompt counting


def _examples() -> list[dict[str, Any]]:
    return json.loads(EXAMPLES_FILE.read_text(encoding="utf-8"))["examples"]


def test_examples_file_cites_a_source_for_each_example() -> None:
    doc = json.loads(EXAMPLES_FILE.read_text(encoding="utf-8"))
    for source in doc["sources"].values():
        assert source["url"].startswith("https://github.com/")
    examples = doc["examples"]
    assert {e["source"] for e in examples} <= set(doc["sources"])
    assert {e["encoding"] for e in examples} == set(SUPPORTED_ENCODINGS)
    assert any(m.get("name") for e in examples for m in e["body"]["messages"])
    assert any("tools" in e["body"] for e in examples)
    assert len({e["id"] for e in examples}) == len(examples)


@pytest.mark.parametrize("example", _examples(), ids=lambda e: e["id"])
def test_prompt_tokens_match_openai(registry: EncodingRegistry, example: dict[str, Any]) -> None:
    # Exact, except that schema text the published rendering drops (nested
    # descriptions, titles, examples, defaults) is counted on top on purpose: the
    # estimate must not undercount what newer models are given (tokens.py rule 5).
    enc = registry.get(example["encoding"])
    body = example["body"]
    defs = list(body.get("functions", [])) + [t["function"] for t in body.get("tools", [])]
    extra = sum(count_text(enc, t) for t in unrendered_schema_text(defs))
    assert count_chat_prompt(enc, body) == example["prompt_tokens"] + extra


def test_function_rendering_is_typescript() -> None:
    weather = {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "enum": [1, 2.0]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "raw": {"type": "array"},
            },
            "required": ["location"],
        },
    }
    assert render_function_definitions([weather, {"name": "ping"}]) == "\n".join(
        [
            "namespace functions {",
            "",
            "// Get the current weather in a given location",
            "type get_current_weather = (_: {",
            "// The city, e.g. Paris",
            "location: string,",
            'unit?: "celsius" | "fahrenheit",',
            "days?: 1 | 2,",
            "tags?: string[],",
            "raw?: any[],",
            "}) => any;",
            "",
            "type ping = () => any;",
            "",
            "} // namespace functions",
        ]
    )


@pytest.fixture
def o200k(registry: EncodingRegistry) -> tiktoken.Encoding:
    return registry.get("o200k_base")


FN = {
    "name": "lookup",
    "description": "Look a word up",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
}


def test_tools_cost_the_same_as_functions(o200k: tiktoken.Encoding) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    as_tools = count_chat_prompt(
        o200k, {"messages": msgs, "tools": [{"type": "function", "function": FN}]}
    )
    as_functions = count_chat_prompt(o200k, {"messages": msgs, "functions": [FN]})
    assert as_tools == as_functions > count_chat_prompt(o200k, {"messages": msgs})
    forced_tool = {"type": "function", "function": {"name": "lookup"}}
    assert count_chat_prompt(
        o200k, {"messages": msgs, "functions": [FN], "tool_choice": forced_tool}
    ) == count_chat_prompt(
        o200k, {"messages": msgs, "functions": [FN], "function_call": {"name": "lookup"}}
    )


def test_tool_calls_and_tool_results_cost_like_function_calls(o200k: tiktoken.Encoding) -> None:
    args = '{"word": "ocean"}'
    legacy = [
        {"role": "user", "content": "define ocean"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "lookup", "arguments": args},
        },
        {"role": "function", "name": "lookup", "content": "a large body of water"},
    ]
    modern = [
        {"role": "user", "content": "define ocean"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a large body of water"},
    ]
    # "tool" and "function" are one token each in both encodings.
    assert count_chat_prompt(o200k, {"messages": modern}) == count_chat_prompt(
        o200k, {"messages": legacy}
    )
    two_calls = json.loads(json.dumps(modern))
    two_calls[1]["tool_calls"].append(
        {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": args}}
    )
    extra = count_text(o200k, "lookup") + count_text(o200k, args) + 3
    assert count_chat_prompt(o200k, {"messages": two_calls}) == (
        count_chat_prompt(o200k, {"messages": modern}) + extra
    )


def test_content_parts(o200k: tiktoken.Encoding) -> None:
    plain = {"messages": [{"role": "user", "content": "What is in this picture?"}]}
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in "},
                    {"type": "text", "text": "this picture?"},
                ],
            }
        ]
    }
    assert count_chat_prompt(o200k, parts) == count_chat_prompt(o200k, plain)
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}
    parts["messages"][0]["content"].extend([image, image, {"type": "input_audio"}])
    # A remote image's size is unknown: the most any image costs (media.py); audio
    # without data costs nothing.
    assert count_chat_prompt(o200k, parts) == count_chat_prompt(o200k, plain) + 2 * 1445
    image["image_url"]["detail"] = "low"
    assert (
        count_chat_prompt(o200k, parts) == count_chat_prompt(o200k, plain) + 2 * IMAGE_PART_TOKENS
    )


def test_name_and_special_text_in_messages(o200k: tiktoken.Encoding) -> None:
    base = {"messages": [{"role": "user", "content": "<|endoftext|> hi"}]}
    assert count_chat_prompt(o200k, base) == 3 + 1 + count_text(o200k, "<|endoftext|> hi") + 3
    named = {"messages": [{"role": "user", "name": "bob", "content": "<|endoftext|> hi"}]}
    assert count_chat_prompt(o200k, named) == count_chat_prompt(o200k, base) + 1 + 1


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": "hello"},
        {"messages": [None, 3, "x", {"role": 5, "content": {"a": 1}}]},
        {"messages": [{"role": "user", "content": [None, {"type": "text", "text": 7}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "x"}]}]},
        {"messages": [], "tools": [None, {"type": "function", "function": {"parameters": 3}}]},
        {"messages": [], "functions": [{"name": "f", "parameters": {"properties": {"a": 1}}}]},
        {"messages": [], "tool_choice": {"type": "function"}},
    ],
)
def test_malformed_bodies_do_not_raise(o200k: tiktoken.Encoding, body: dict[str, Any]) -> None:
    assert count_chat_prompt(o200k, body) >= 3


def test_count_completion(o200k: tiktoken.Encoding) -> None:
    text = "The ocean is a large body of salt water."
    assert count_completion(o200k, text) == len(o200k.encode_ordinary(text))
    assert count_completion(o200k, None) == 0
    calls = [("lookup", '{"word": "ocean"}'), ("lookup", '{"word": "sea"}')]
    expected = sum(count_text(o200k, n) + count_text(o200k, a) for n, a in calls)
    assert count_completion(o200k, "", calls) == expected
    assert count_completion(o200k, text, calls) == expected + count_text(o200k, text)


# -- the plain-body fast path ------------------------------------------------------

_plain_roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "function", ""])
_plain_message = st.one_of(
    st.fixed_dictionaries({"role": _plain_roles, "content": st.text(max_size=40)}),
    # not plain: a name, a non-string content, an extra key, a list of parts
    st.fixed_dictionaries(
        {"role": _plain_roles, "content": st.text(max_size=10), "name": st.text(max_size=5)}
    ),
    st.fixed_dictionaries(
        {
            "role": _plain_roles,
            "content": st.one_of(
                st.none(),
                st.integers(),
                st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                    max_size=2,
                ),
            ),
        }
    ),
)
_plain_body = st.fixed_dictionaries(
    {"messages": st.lists(_plain_message, max_size=5)},
    optional={
        "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        "tool_choice": st.sampled_from(["none", "auto"]),
        "response_format": st.just({"type": "json_schema", "json_schema": {"name": "x"}}),
        "max_tokens": st.integers(1, 100),
    },
)


@given(body=_plain_body)
@settings(max_examples=300, deadline=None)
def test_the_plain_path_counts_what_the_general_path_counts(
    body: dict[str, Any], registry: EncodingRegistry
) -> None:
    from proxy.billing.counting import TokenCounter
    from proxy.billing.tokens import _general_prompt, _plain_prompt

    for enc in (None, registry.get("o200k_base")):
        fast = _plain_prompt(TokenCounter(enc), body)
        general = _general_prompt(TokenCounter(enc), body)
        if fast is not None:
            assert fast == general
        assert count_chat_prompt(enc, body) == general
    plain = all(
        isinstance(m.get("content"), str)
        and set(m) == {"role", "content"}
        and m["role"] != "function"
        for m in body["messages"]
    ) and not ({"tools", "tool_choice", "response_format"} & set(body))
    assert (_plain_prompt(TokenCounter(None), body) is not None) == plain
