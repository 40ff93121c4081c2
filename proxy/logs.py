"""Logging shared by every program: set-up, the access-log channel, a throttled
warning, URL redaction. Nothing here logs keys or prompts; callers pass neither."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

# One JSON object per request (proxy.telemetry.access_log), bare on stdout.
ACCESS_LOGGER = "proxy.access"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # Access lines are bare JSON objects on stdout, one per request, for log shippers.
    plain_access_log(sys.stdout)


class PlainLineHandler(logging.StreamHandler[TextIO]):
    """The message alone, one per line: what `plain_access_log` installs. The access
    writer (proxy.telemetry.access_log) writes straight to its stream while it is the
    access logger's only handler (no LogRecord, formatter or flush per line)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter("%(message)s"))


def plain_access_log(stream: TextIO) -> logging.Handler:
    """Write the access log to `stream` as bare JSON lines (no time/level prefix, not
    repeated by the root handlers), so a log shipper can parse every line as one
    object. Returns the handler (to remove it)."""
    handler = PlainLineHandler(stream)
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(handler)
    access.propagate = False
    return handler


class ThrottledLog:
    """At most one warning per interval; counts what it swallowed in between."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *, exc_info: bool = False) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        self._log.warning("%s (%d similar suppressed)", message, suppressed, exc_info=exc_info)


def redact_url(url: str) -> str:
    """The URL without user:password, for start-up logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
