"""The metering side of each endpoint's wire format, in one table.

The request path is the same code for every endpoint (proxy.server.handlers);
what differs is only how a body is counted and how a reply and its usage report
are read. Each `WireFormat` names those pieces; `FORMATS` maps the charge event's
`endpoint` values (proxy.contract.charge_event.ENDPOINTS) to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.billing.counting import TokenCounter
from proxy.billing.endpoint_replies import (
    completions_reply,
    completions_stream_reply,
    no_reply,
    responses_reply,
    responses_stream_reply,
)
from proxy.billing.endpoint_tokens import (
    count_completions_prompt,
    count_embeddings_input,
    count_responses_input,
)
from proxy.billing.metering import Reply, message_reply, stream_reply
from proxy.billing.tokens import count_chat_prompt
from proxy.billing.usage_report import (
    CHAT_USAGE,
    EMBEDDINGS_USAGE,
    RESPONSES_USAGE,
    UsageFields,
    UsageReport,
    find_report,
)

# Byte fragments of relayed text, for the cheap "was any text relayed" check.
CHAT_TEXT_KEYS: Final = (b'content":"', b'arguments":"', b'transcript":"', b'refusal":"')


@dataclass(frozen=True, slots=True)
class WireFormat:
    endpoint: str  # the charge event's `endpoint`
    count_prompt: Callable[[TokenCounter, Mapping[str, Any]], int]
    json_reply: Callable[[Mapping[str, Any]], Reply]
    stream_reply: Callable[[Iterable[Mapping[str, Any]]], Reply]
    usage: UsageFields
    text_keys: tuple[bytes, ...]
    # A stream reports usage only when asked (`stream_options.include_usage`); the
    # proxy asks on the caller's behalf and removes what the caller did not ask for.
    stream_usage_option: bool
    # The usage report has chat's shape, so the caller's copy can carry `usage.cost`
    # (cost in band, proxy.upstream.cost_stamp); elsewhere the alias's flag is ignored.
    cost_in_band: bool = False

    def find_report(self, obj: Mapping[str, Any]) -> UsageReport | None:
        return find_report(obj, self.usage)


CHAT: Final = WireFormat(
    "chat.completions",
    count_chat_prompt,
    message_reply,
    stream_reply,
    CHAT_USAGE,
    CHAT_TEXT_KEYS,
    stream_usage_option=True,
    cost_in_band=True,
)
COMPLETIONS: Final = WireFormat(
    "completions",
    count_completions_prompt,
    completions_reply,
    completions_stream_reply,
    CHAT_USAGE,
    (b'text":"',),
    stream_usage_option=True,
    cost_in_band=True,
)
EMBEDDINGS: Final = WireFormat(
    "embeddings",
    count_embeddings_input,
    no_reply,
    no_reply,
    EMBEDDINGS_USAGE,
    (),
    stream_usage_option=False,
)
# Responses streams always end with the usage (in `response.completed`).
RESPONSES: Final = WireFormat(
    "responses",
    count_responses_input,
    responses_reply,
    responses_stream_reply,
    RESPONSES_USAGE,
    (b'delta":"', b'arguments":"', b'text":"'),
    stream_usage_option=False,
)
FORMATS: Final = {f.endpoint: f for f in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)}
