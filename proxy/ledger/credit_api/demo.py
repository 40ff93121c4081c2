"""What `llm-proxy demo` signs in to its store page with: a fresh user key per run,
held in memory (the demo has no Redis), printed once at start-up."""

from __future__ import annotations

import secrets
from typing import Final

from proxy.ledger.apikeys import KEY_PREFIX

DEMO_USER: Final = 42


def demo_store_key() -> str:
    return f"{KEY_PREFIX}demo-{secrets.token_urlsafe(18)}"
