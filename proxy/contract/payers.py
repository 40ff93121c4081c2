"""Who can be charged: the user id range every part of the system agrees on."""

from __future__ import annotations

MAX_USER_ID = 2**63 - 1  # fits the signed 64-bit ids a ledger stores


def check_user_id(user_id: object) -> int:
    """The range billing accepts (0 means "nobody to charge", so it has no balance)."""
    if isinstance(user_id, bool) or not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
        raise ValueError(f"user id must be an integer in 1..{MAX_USER_ID}, got {user_id!r}")
    return user_id


def canonical_user_id(text: str) -> int | None:
    """A payer id written canonically (ASCII decimal digits, no sign, no leading
    zero, 1..MAX_USER_ID), or None. The one rule every header and body follows."""
    if not (0 < len(text) <= 19) or not text.isascii() or not text.isdigit() or text[0] == "0":
        return None
    value = int(text)
    return value if value <= MAX_USER_ID else None


def stored_user_id(raw: bytes | str | None) -> int | None:
    """The user id an API key maps to in Redis (`apikey:<sha256>`), or None when the
    value is missing or not a user id."""
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    if not (0 < len(text) <= 19) or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if 0 < value <= MAX_USER_ID else None
