"""Who can be charged: the user id range every part of the system agrees on."""

from __future__ import annotations

MAX_USER_ID = 2**63 - 1  # fits the signed 64-bit ids a ledger stores


def check_user_id(user_id: object) -> int:
    """The range billing accepts (0 means "nobody to charge", so it has no balance)."""
    if isinstance(user_id, bool) or not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
        raise ValueError(f"user id must be an integer in 1..{MAX_USER_ID}, got {user_id!r}")
    return user_id
