"""The billed endpoints: for each, its route, the upstream path and the parser of
its body. Everything else of a request (auth, alias, admission, upstream, relay,
metering, settlement) is the one pipeline in proxy.server.handlers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.billing.record import ChatRequest
from proxy.config.model import Alias
from proxy.server.api_requests import (
    parse_completions_request,
    parse_embeddings_request,
    parse_responses_request,
)
from proxy.server.chat_request import parse_chat_request

Parser = Callable[..., ChatRequest]  # (body, aliases, *, started_ms) -> ChatRequest


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # the charge event's `endpoint`
    route: str  # where callers POST
    path: str  # where the provider is called, under its base URL
    parse: Parser

    def parse_body(
        self, body: dict[str, Any], aliases: Mapping[str, Alias], *, started_ms: int
    ) -> ChatRequest:
        return self.parse(body, aliases, started_ms=started_ms)


CHAT_COMPLETIONS: Final = Endpoint(
    "chat.completions", "/v1/chat/completions", "/chat/completions", parse_chat_request
)
RESPONSES: Final = Endpoint("responses", "/v1/responses", "/responses", parse_responses_request)
EMBEDDINGS: Final = Endpoint(
    "embeddings", "/v1/embeddings", "/embeddings", parse_embeddings_request
)
COMPLETIONS: Final = Endpoint(
    "completions", "/v1/completions", "/completions", parse_completions_request
)
BILLED: Final = (CHAT_COMPLETIONS, RESPONSES, EMBEDDINGS, COMPLETIONS)
