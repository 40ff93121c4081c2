"""Offline tiktoken encodings and OpenAI chat token counting.

Counting is the metering fallback, used when an upstream reports no usage. Two
halves:

* **Loading.** The official ``cl100k_base`` / ``o200k_base`` rank files ship
  byte-identical (gzipped) inside the ``bpe-openai`` wheel, so nothing is ever
  downloaded: we gunzip, check the sha256 that tiktoken itself expects, parse the
  ranks exactly like ``tiktoken.load.load_tiktoken_bpe`` and build a
  ``tiktoken.Encoding``. ``EncodingRegistry`` (owned by the app) does this once per
  name, lazily and thread-safely; a load costs ~0.15 s (cl100k) / ~0.25 s (o200k), so
  call ``preload`` at start-up, off the event loop.
* **Counting.** Pure functions over an ``Encoding``: ``count_text``,
  ``count_chat_prompt`` (the ``prompt_tokens`` OpenAI would report for a
  chat.completions body) and ``count_completion``. The rules are documented on
  ``count_chat_prompt`` with their sources.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tiktoken

DEFAULT_ENCODING = "o200k_base"

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True, slots=True)
class EncodingSpec:
    """What tiktoken's own constructor would use for an encoding.

    Replicated from ``tiktoken_ext/openai_public.py`` (tiktoken 0.7-0.14): its
    constructors call ``load_tiktoken_bpe`` on an https URL and so cannot be
    called offline. ``tests/test_tokens.py`` checks that these values equal what
    the installed tiktoken's constructors pass.
    """

    name: str
    sha256: str  # of the decompressed .tiktoken file
    pat_str: str
    special_tokens: tuple[tuple[str, int], ...]


_SPECS: Mapping[str, EncodingSpec] = MappingProxyType(
    {
        "cl100k_base": EncodingSpec(
            name="cl100k_base",
            sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
            pat_str=(
                r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
            ),
            special_tokens=(
                (_ENDOFTEXT, 100257),
                (_FIM_PREFIX, 100258),
                (_FIM_MIDDLE, 100259),
                (_FIM_SUFFIX, 100260),
                (_ENDOFPROMPT, 100276),
            ),
        ),
        "o200k_base": EncodingSpec(
            name="o200k_base",
            sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
            pat_str="|".join(
                [
                    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                    r"""\p{N}{1,3}""",
                    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                    r"""\s*[\r\n]+""",
                    r"""\s+(?!\S)""",
                    r"""\s+""",
                ]
            ),
            special_tokens=((_ENDOFTEXT, 199999), (_ENDOFPROMPT, 200018)),
        ),
    }
)

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_SPECS)


class EncodingLoadError(RuntimeError):
    """An encoding could not be loaded: unknown name, missing or corrupt file."""


def encoding_spec(name: str) -> EncodingSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise EncodingLoadError(
            f"unsupported encoding {name!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        ) from None


def packaged_data_dir() -> Path:
    """Where the ``bpe-openai`` wheel keeps ``{name}.tiktoken.gz``.

    Located with ``find_spec`` rather than ``importlib.resources.files``: the latter
    imports ``bpe_openai``, whose ``__init__`` eagerly parses cl100k in Python
    (~0.3 s, plus a DeprecationWarning) although we only want its data files.
    """
    spec = importlib.util.find_spec("bpe_openai")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise EncodingLoadError("the bpe-openai package (which ships the encodings) is missing")
    return Path(next(iter(locations))) / "data"


def parse_tiktoken_bpe(contents: bytes) -> dict[bytes, int]:
    """Parse ``base64(token) rank`` lines, as ``tiktoken.load.load_tiktoken_bpe`` does."""
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except Exception as e:
            raise EncodingLoadError(f"malformed rank line {line[:80]!r}") from e
    return ranks


def load_encoding(name: str, data_dir: Path | None = None) -> tiktoken.Encoding:
    """Build one encoding from ``{data_dir}/{name}.tiktoken.gz``; never touches the network.

    Raises ``EncodingLoadError`` on an unknown name, a missing/unreadable file, or a
    sha256 mismatch of the decompressed bytes (a corrupted or substituted file would
    otherwise silently miscount every request).
    """
    spec = encoding_spec(name)
    source = (data_dir if data_dir is not None else packaged_data_dir()).joinpath(
        f"{name}.tiktoken.gz"
    )
    try:
        contents = gzip.decompress(source.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise EncodingLoadError(f"cannot read encoding file {source}: {e}") from e
    actual = hashlib.sha256(contents).hexdigest()
    if actual != spec.sha256:
        raise EncodingLoadError(
            f"sha256 mismatch for {name} ({source}): expected {spec.sha256}, got {actual}; "
            "the file is corrupted or not the official encoding"
        )
    return tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=parse_tiktoken_bpe(contents),
        special_tokens=dict(spec.special_tokens),
    )


class EncodingRegistry:
    """Loads each encoding at most once, on first use or via ``preload``. Thread-safe."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = data_dir
        self._encodings: dict[str, tiktoken.Encoding] = {}
        # One lock for all names: loads are rare (once per name per process) and a
        # second caller must wait for the first rather than load the same file twice.
        self._lock = threading.Lock()

    def get(self, name: str) -> tiktoken.Encoding:
        enc = self._encodings.get(name)  # lock-free fast path: dict reads are atomic
        if enc is not None:
            return enc
        with self._lock:
            enc = self._encodings.get(name)
            if enc is None:
                enc = load_encoding(name, self._data_dir)
                self._encodings[name] = enc
            return enc

    def preload(self, names: Iterable[str]) -> None:
        for name in names:
            self.get(name)

    def loaded(self) -> tuple[str, ...]:
        return tuple(self._encodings)


# --------------------------------------------------------------------------- counting

# Per-message framing: <|start|>{role/name}\n{content}<|end|>\n (cookbook, see below).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
# Every reply is primed with <|start|>assistant<|message|>.
REPLY_PRIMING = 3
# Function definitions are wrapped in a system-side block; 9 tokens, 4 of which are
# shared with an existing system message (openai-chat-tokens, see below).
FUNCTIONS_OVERHEAD = 9
FUNCTIONS_SYSTEM_DISCOUNT = 4
FUNCTION_CALL_OVERHEAD = 3  # an assistant message's function_call / each tool call
FUNCTION_RESULT_ADJUST = -2  # a `function` (and, by extension, `tool`) result message
FORCED_FUNCTION_OVERHEAD = 4  # function_call={"name": ...} / tool_choice naming one
CHOICE_NONE_TOKENS = 1  # function_call="none" / tool_choice="none"
# An image part's size is unknown without fetching/decoding it; 85 tokens is the fixed
# base cost of one image (= all of a detail="low" image) for gpt-4o in OpenAI's vision
# pricing docs, so this is a lower bound for detail="high"/"auto".
IMAGE_PART_TOKENS = 85


def count_text(enc: tiktoken.Encoding, text: str) -> int:
    """Tokens in ``text``; special-token-looking text counts as plain text, never raises."""
    return len(enc.encode_ordinary(text)) if text else 0


def count_chat_prompt(enc: tiktoken.Encoding, body: Mapping[str, Any]) -> int:
    """The ``prompt_tokens`` OpenAI would report for a chat.completions request body.

    Rules (same constants for cl100k_base and o200k_base models):

    1. Each message costs 3 + tokens(role) + tokens(content); a ``name`` adds
       tokens(name) + 1. Every reply is primed with 3 more tokens.
       Source: openai-cookbook ``examples/How_to_count_tokens_with_tiktoken.ipynb``
       ("Counting tokens for chat completions API calls"), verified there against the
       API: 129 prompt tokens (gpt-3.5-turbo, gpt-4) / 124 (gpt-4o, gpt-4o-mini).
    2. ``functions`` / ``tools`` (type "function") are rendered as TypeScript in a
       ``namespace functions { ... }`` block (``render_function_definitions``); they
       cost tokens(rendering) + 9. If there is a system message, the first one gets
       a trailing "\\n" and the total is 4 lower (the block reuses that message).
       An assistant ``function_call`` costs tokens(name) + tokens(arguments) + 3; a
       ``function`` result message costs 2 less than rule 1 gives. ``function_call``
       "none" adds 1; forcing a function by name adds tokens(name) + 4.
       Source: the npm library openai-chat-tokens (github.com/hmarr/openai-chat-tokens,
       continued as coderabbitai/openai-chat-tokens), whose test cases were checked
       against the live API (gpt-3.5-turbo), after the OpenAI forum thread
       "How to calculate the tokens when using function call" (topic 266573). The
       same rendering reproduces the cookbook's "Counting tokens for chat
       completions with tool calls" figures: 105 (gpt-3.5-turbo, gpt-4) and 101
       (gpt-4o, gpt-4o-mini).
    3. Extrapolations without a published figure: each assistant ``tool_calls``
       entry is costed like a ``function_call``; a ``tool`` message like a
       ``function`` message named after the call its ``tool_call_id`` answers;
       ``tool_choice`` like ``function_call``; ``developer`` is costed like any role.
    4. Content given as a list of parts: text (and refusal) parts are concatenated;
       each image part costs ``IMAGE_PART_TOKENS`` (a lower bound, see there); audio
       and file parts are not counted. Other body fields (``response_format``
       schemas, ...) are not counted.

    Malformed parts of ``body`` are skipped, never raised on: validation is not
    this function's job and billing must not fail on odd input.
    """
    messages = body.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        messages = ()
    functions = _function_definitions(body)
    total = REPLY_PRIMING
    padded_system = False
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = _str(message.get("role"))
        text, images = _content(message.get("content"))
        if functions and role == "system" and not padded_system:
            text += "\n"
            padded_system = True
        tokens = TOKENS_PER_MESSAGE + count_text(enc, role) + count_text(enc, text)
        tokens += images * IMAGE_PART_TOKENS
        name = _str(message.get("name"))
        if role == "tool":
            name = call_names.get(_str(message.get("tool_call_id")), "")
        if name:
            tokens += count_text(enc, name) + TOKENS_PER_NAME
        if role == "function" or (role == "tool" and name):
            tokens += FUNCTION_RESULT_ADJUST
        for call_id, fn_name, arguments in _calls(message):
            tokens += count_text(enc, fn_name) + count_text(enc, arguments)
            tokens += FUNCTION_CALL_OVERHEAD
            if call_id:
                call_names[call_id] = fn_name
        total += tokens
    if functions:
        total += count_text(enc, render_function_definitions(functions)) + FUNCTIONS_OVERHEAD
        if padded_system:
            total -= FUNCTIONS_SYSTEM_DISCOUNT
    choice = body.get("tool_choice", body.get("function_call"))
    if choice == "none":
        total += CHOICE_NONE_TOKENS
    elif isinstance(choice, Mapping):
        fn = choice.get("function")
        forced = _str(fn.get("name")) if isinstance(fn, Mapping) else _str(choice.get("name"))
        if forced:
            total += count_text(enc, forced) + FORCED_FUNCTION_OVERHEAD
    return max(total, 0)


def count_completion(
    enc: tiktoken.Encoding,
    content: str | None,
    tool_calls: Iterable[tuple[str, str]] = (),
) -> int:
    """Completion tokens for text and ``(name, arguments)`` tool calls actually relayed.

    Plain text counts exactly. For tool calls only the name and arguments are counted:
    OpenAI's framing tokens around a generated call are unpublished, so this is a lower
    bound. Hidden reasoning tokens cannot be known and are not estimated.
    """
    total = count_text(enc, content or "")
    for name, arguments in tool_calls:
        total += count_text(enc, name) + count_text(enc, arguments)
    return total


# ------------------------------------------------------------- function definitions


def render_function_definitions(functions: Sequence[Mapping[str, Any]]) -> str:
    """JSON-schema function definitions as the TypeScript OpenAI shows the model.

    Format per openai-chat-tokens (see ``count_chat_prompt``): descriptions become
    ``//`` comments (only at the top two levels), optional properties get ``?``,
    enums become unions, ``anyOf`` becomes a union, arrays ``T[]``.
    """
    lines = ["namespace functions {", ""]
    for fn in functions:
        description = _str(fn.get("description"))
        if description:
            lines.append(f"// {description}")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        if isinstance(props, Mapping) and props:
            lines.append(f"type {_str(fn.get('name'))} = (_: {{")
            lines.append(_format_properties(params, 0))
            lines.append("}) => any;")
        else:
            lines.append(f"type {_str(fn.get('name'))} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


def _format_properties(obj: Mapping[str, Any], indent: int) -> str:
    props = obj.get("properties")
    required = obj.get("required")
    required = required if isinstance(required, list) else []
    lines: list[str] = []
    for name, prop in props.items() if isinstance(props, Mapping) else ():
        if not isinstance(prop, Mapping):
            prop = {}
        description = _str(prop.get("description"))
        if description and indent < 2:
            lines.append(f"// {description}")
        optional = "" if name in required else "?"
        lines.append(f"{name}{optional}: {_format_type(prop, indent)},")
    return "\n".join(" " * indent + line for line in lines)


def _format_type(prop: Mapping[str, Any], indent: int) -> str:
    any_of = prop.get("anyOf")
    if isinstance(any_of, list):
        return " | ".join(_format_type(p if isinstance(p, Mapping) else {}, indent) for p in any_of)
    kind = prop.get("type")
    enum = prop.get("enum")
    if isinstance(enum, list) and kind in ("string", "number", "integer"):
        return " | ".join(f'"{v}"' if kind == "string" else _js_literal(v) for v in enum)
    if kind in ("string", "number", "boolean", "null"):
        return str(kind)
    if kind == "integer":
        return "number"
    if kind == "object":
        return "\n".join(["{", _format_properties(prop, indent + 2), "}"])
    if kind == "array":
        items = prop.get("items")
        return f"{_format_type(items, indent)}[]" if isinstance(items, Mapping) else "any[]"
    return "any"


def _js_literal(value: Any) -> str:
    # Enum values are printed the way JavaScript's template strings print them.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ------------------------------------------------------------------------ helpers


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _content(content: Any) -> tuple[str, int]:
    """(concatenated text, number of image parts) of a message's content."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in ("text", "refusal"):
            texts.append(_str(part.get(kind)))
        elif kind == "image_url":
            images += 1
    return "".join(texts), images


def _calls(message: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(tool_call_id, name, arguments) of an assistant message's function/tool calls."""
    calls: list[tuple[str, str, str]] = []
    fc = message.get("function_call")
    if isinstance(fc, Mapping):
        calls.append(("", _str(fc.get("name")), _str(fc.get("arguments"))))
    tool_calls = message.get("tool_calls")
    for call in tool_calls if isinstance(tool_calls, list) else ():
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping):
            calls.append((_str(call.get("id")), _str(fn.get("name")), _str(fn.get("arguments"))))
    return calls


def _function_definitions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    defs: list[Mapping[str, Any]] = []
    functions = body.get("functions")
    for fn in functions if isinstance(functions, list) else ():
        if isinstance(fn, Mapping):
            defs.append(fn)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, Mapping) and tool.get("type", "function") == "function":
            fn = tool.get("function")
            if isinstance(fn, Mapping):
                defs.append(fn)
    return defs
