"""The access log: one JSON object per request on the `proxy.access` logger, at INFO.

It carries who (user, scene, principal), what (alias, tokens, credits) and how
(status, outcome, latency, TTFT, guard), and never prompt or completion text, API
keys or request headers: it is built from the `Exchange` fields named below only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
    event = settlement.event if settlement is not None else None
    charge = settlement.charge if settlement is not None else None
    first = ex.first_byte_at
    line: dict[str, Any] = {"time": _now_text()}
    if ctx is not None:
        line["request_id"] = ctx.request_id
        line["user_id"] = ctx.user_id
        line["scene"] = ctx.scene
        line["principal"] = ctx.principal
    else:
        line["request_id"] = line["user_id"] = line["scene"] = line["principal"] = None
    if chat is not None:
        alias = chat.alias
        line["alias"] = alias.name
        line["endpoint"] = chat.endpoint
        line["provider"] = alias.provider.name
        # The target that served (or the last one tried) and the attempts made.
        line["target"] = f"{alias.provider.name}/{alias.model}"
        line["stream"] = chat.stream
    else:
        line["alias"] = line["endpoint"] = line["provider"] = line["target"] = None
        line["stream"] = None
    line["attempts"] = ex.attempts
    line["status"] = ex.status
    line["outcome"] = ex.outcome
    line["error_kind"] = ex.error_kind
    line["guard"] = ex.guard_decision
    if metered is not None:
        usage = metered.usage
        line["tokens"] = {
            "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens,
            "cached": usage.cached_tokens,
            "reasoning": usage.reasoning_tokens,
        }
        line["usage_source"] = metered.source
        line["metering_flags"] = sorted(metered.flags) if metered.flags else []
    else:
        line["tokens"] = line["usage_source"] = None
        line["metering_flags"] = []
    line["client_disconnected"] = ex.client_disconnected
    line["credits"] = charge.credits if charge is not None and event is not None else 0
    line["charged"] = event is not None
    line["latency_ms"] = round((now - ex.started) * 1000, 3)
    line["ttft_ms"] = None if first is None else round((first - ex.started) * 1000, 3)
    return orjson.dumps(line).decode()


# The last second formatted: one strftime a second, not one a line.
_second: tuple[int, str] = (-1, "")


def _now_text() -> str:
    """Now, as orjson writes `datetime.now(UTC)` with OPT_UTC_Z:
    `2024-05-01T12:00:00.123456Z` (no fraction when the microseconds are 0)."""
    global _second
    seconds, ns = divmod(time.time_ns(), 1_000_000_000)
    last, text = _second
    if seconds != last:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)
    micros = ns // 1000
    # str(10**6 + micros)[1:]: the six digits, zero-padded, without a format spec.
    return f"{text}.{str(micros + 1_000_000)[1:]}Z" if micros else f"{text}Z"


# Access lines are written out together, at most this long after the first of them:
# flushed once per loop round, a saturated proxy still made one write() system call
# per request (1 in 3 of the relay's: bench, `/proc/<pid>/io` syscw), and with
# PYTHONUNBUFFERED (common in containers) stdout writes through on every line.
# Stopping flushes what is left (Observer.close).
FLUSH_INTERVAL_S = 0.05
# ... or once this many are waiting (a bound on the memory they hold).
MAX_PENDING_LINES = 256


class AccessWriter:
    """Writes access lines to the `proxy.access` logger, cheaply.

    While that logger's only handler is the plain one `setup_logging` installs (and
    nothing filters), lines are collected here and written to the handler's stream
    as one write, `flush_interval_s` after the first (or at `MAX_PENDING_LINES`):
    the stdlib path (LogRecord, formatter, lock, a write syscall per line) cost ~8 µs
    a request. Any other set-up (pytest's caplog, an operator's handler or filter)
    gets every line through `logging` as before.
    """

    def __init__(
        self, logger: logging.Logger | None = None, flush_interval_s: float = FLUSH_INTERVAL_S
    ) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._interval = flush_interval_s
        self._pending: list[str] = []
        self._stream: TextIO | None = None  # where the pending lines go
        self._timer: asyncio.TimerHandle | None = None

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
        if stream is not self._stream:
            self.flush()  # the earlier lines to the earlier stream
            self._stream = stream
        pending = self._pending  # after that flush: it starts a new list
        pending.append(line)
        if len(pending) == 1:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)
            except RuntimeError:  # no loop (tests, tools): write now
                self.flush()
        elif len(pending) >= MAX_PENDING_LINES:
            self.flush()

    def flush(self) -> None:
        """Write out the pending lines (also when stopping: nothing is left behind)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._pending = self._pending, []
        stream = self._stream
        if lines and stream is not None:
            with contextlib.suppress(Exception):  # a closed or broken stream: dropped
                stream.write("\n".join(lines) + "\n")
                stream.flush()
