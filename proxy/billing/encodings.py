"""Offline tiktoken encodings: loading the official rank files without a network.

The official ``cl100k_base`` / ``o200k_base`` rank files ship byte-identical
(gzipped) inside the ``bpe-openai`` wheel, so nothing is ever downloaded: we gunzip,
check the sha256 that tiktoken itself expects, parse the ranks exactly like
``tiktoken.load.load_tiktoken_bpe`` and build a ``tiktoken.Encoding``.
``EncodingRegistry`` (owned by the app) does this once per name, lazily and
thread-safely; a load costs ~0.15 s (cl100k) / ~0.25 s (o200k), so call ``preload``
at start-up, off the event loop.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import tiktoken

from proxy.config.model import DEFAULT_ENCODING, SUPPORTED_ENCODINGS

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


class EncodingLoadError(RuntimeError):
    """An encoding could not be loaded: unknown name, missing or corrupt file."""


def encoding_spec(name: str) -> EncodingSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise EncodingLoadError(
            f"unsupported encoding {name!r}; supported: {', '.join(sorted(SUPPORTED_ENCODINGS))}"
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


__all__ = ["DEFAULT_ENCODING", "SUPPORTED_ENCODINGS", "EncodingRegistry", "load_encoding"]
