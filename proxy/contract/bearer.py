"""The API key as callers send it (`Authorization: Bearer <key>`): one reading for the
proxy and the ledger's credit API."""

from __future__ import annotations

import re

MAX_KEY_LEN = 512  # longer "keys" are garbage; refuse before hashing them
_VISIBLE_ASCII_RE = re.compile(r"[\x21-\x7e]+")


class MalformedAuthorization(ValueError):
    """An Authorization header that is not `Bearer <key>`."""


def bearer_key(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header; None when there is none
    (absent or blank); MalformedAuthorization when it is not that form."""
    if header is None or not header.strip():
        return None
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if (
        scheme.lower() != "bearer"
        or not key
        or len(key) > MAX_KEY_LEN
        or not _VISIBLE_ASCII_RE.fullmatch(key)
    ):
        raise MalformedAuthorization("expected 'Bearer <key>'")
    return key
