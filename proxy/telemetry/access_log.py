"""The access log: one JSON object per request on the `proxy.access` logger, at INFO.

It carries who (user, scene, principal), what (alias, tokens, credits) and how
(status, outcome, latency, TTFT, guard), and never prompt or completion text, API
keys or request headers: it is built from the `Exchange` fields named below only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from proxy.logs import ACCESS_LOGGER, PlainLineHandler

if TYPE_CHECKING:
    from proxy.billing.record import Exchange
    from proxy.billing.settlement import Settlement


def access_line(ex: Exchange, settlement: Settlement | None, now: float) -> str:
    """The access-log JSON of one request (one orjson dump)."""
    ctx = ex.ctx
    chat = ex.chat
    metered = ex.metered
    charged = settlement is not None and settlement.event is not None
    line: dict[str, Any] = {
        "time": datetime.now(UTC),
        "request_id": ctx.request_id if ctx else None,
        "user_id": ctx.user_id if ctx else None,
        "scene": ctx.scene if ctx else None,
        "principal": ctx.principal if ctx else None,
        "alias": chat.alias.name if chat else None,
        "provider": chat.alias.provider.name if chat else None,
        "stream": chat.stream if chat else None,
        "status": ex.status,
        "outcome": ex.outcome,
        "error_kind": ex.error_kind,
        "guard": ex.guard_decision,
        "tokens": None,
        "usage_source": None,
        "metering_flags": [],
        "client_disconnected": ex.client_disconnected,
        "credits": settlement.charge.credits if settlement and settlement.charge and charged else 0,
        "charged": charged,
        "latency_ms": ex.latency_ms(now),
        "ttft_ms": ex.ttft_ms(),
    }
    if metered is not None:
        usage = metered.usage
        line["tokens"] = {
            "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens,
            "cached": usage.cached_tokens,
            "reasoning": usage.reasoning_tokens,
        }
        line["usage_source"] = metered.source
        line["metering_flags"] = sorted(metered.flags)
    return orjson.dumps(line, option=orjson.OPT_UTC_Z).decode()


class AccessWriter:
    """Writes access lines to the `proxy.access` logger, cheaply.

    While that logger's only handler is the plain one `setup_logging` installs (and
    nothing filters), a line goes straight to the handler's stream, and the stream is
    flushed once per event-loop round rather than once per line: the stdlib path
    (LogRecord, formatter, lock, a write syscall per line) cost ~8 µs a request.
    Any other set-up (pytest's caplog, an operator's handler or filter) gets every
    line through `logging` as before.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._dirty: TextIO | None = None  # the stream written since the last flush

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(self, line: str) -> None:
        logger = self.logger
        handlers = logger.handlers
        if len(handlers) != 1 or logger.filters or logger.propagate:
            logger.info(line)
            return
        handler = handlers[0]
        if type(handler) is not PlainLineHandler or handler.filters or handler.level > logging.INFO:
            logger.info(line)
            return
        stream = handler.stream
        try:
            stream.write(line + "\n")
        except Exception:  # a closed or broken stream: logging would drop it too
            return
        if self._dirty is None:
            self._dirty = stream
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (tests, tools): flush now
                self.flush()

    def flush(self) -> None:
        stream, self._dirty = self._dirty, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
