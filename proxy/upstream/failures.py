"""Every upstream failure classified once: outcome, status, error kind and the error
the caller gets, for each phase of the exchange.

* HEAD: waiting for the response head (connect, send, first bytes);
* BODY: reading a non-streamed body (nothing was sent to the caller yet);
* STREAM: relaying a stream (the caller has the head: errors become an SSE event).

A cancellation is our own Watchdog's timeout when it says so (`absorb`), else the
client left. In STREAM a failed write to the client is the client leaving too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

import aiohttp

from proxy.billing.record import ErrorKind
from proxy.contract.outcome import Outcome
from proxy.errors import (
    ApiError,
    upstream_auth_failed,
    upstream_read_failed,
    upstream_timeout,
    upstream_unavailable,
)
from proxy.upstream.watchdog import Watchdog

# Reads from the upstream socket that mean "the upstream went away".
UPSTREAM_READ_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError)
# Writes to the caller that mean "the caller went away" (checked first in STREAM).
CLIENT_WRITE_ERRORS = (ConnectionResetError, aiohttp.ClientConnectionResetError)


class Phase(Enum):
    HEAD = "head"
    BODY = "body"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class Failure:
    outcome: Outcome
    status: int  # what the access log and metrics record
    kind: ErrorKind | None
    # What the caller gets; None when the client left (nobody to answer) or the
    # upstream's own error response is relayed (status failures).
    error: ApiError | None


CLIENT_LEFT = Failure(Outcome.CLIENT_ABORTED, 499, None, None)


def classify(
    exc: BaseException, wd: Watchdog, provider: str, phase: Phase, sent_status: int = 0
) -> Failure | None:
    """The failure `exc` means in `phase`, or None when it is not an upstream failure
    (a bug: let it propagate). `sent_status` is the status already sent (STREAM)."""
    if isinstance(exc, asyncio.CancelledError):
        if not wd.absorb():
            return CLIENT_LEFT
        what = f"{wd.expired}, waiting for the response head" if phase is Phase.HEAD else wd.expired
        status = sent_status if phase is Phase.STREAM else 504
        return Failure(
            Outcome.TIMEOUT, status, ErrorKind.TIMEOUT, upstream_timeout(provider, str(what))
        )
    if phase is Phase.HEAD:
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return Failure(
                Outcome.TIMEOUT, 504, ErrorKind.TIMEOUT, upstream_timeout(provider, "connect")
            )
        if isinstance(exc, aiohttp.ClientError | OSError):
            error = upstream_unavailable(provider, type(exc).__name__)
            return Failure(Outcome.UPSTREAM_ERROR, 502, ErrorKind.CONNECT, error)
        return None
    if phase is Phase.STREAM and isinstance(exc, CLIENT_WRITE_ERRORS):
        return CLIENT_LEFT
    if isinstance(exc, UPSTREAM_READ_ERRORS):
        streaming = phase is Phase.STREAM
        return Failure(
            Outcome.UPSTREAM_ERROR,
            sent_status if streaming else 502,
            ErrorKind.MID_STREAM,
            upstream_read_failed(provider, type(exc).__name__, streaming=streaming),
        )
    return None


# The provider refusing our credentials: the caller's key is not the problem.
UPSTREAM_AUTH_STATUSES = frozenset({401, 403})


def status_failure(status: int, provider: str) -> Failure:
    """The upstream answered 4xx/5xx: its status and (redacted) body are relayed,
    except 401/403, which mean our provider key was refused: 502, neutral error."""
    if status in UPSTREAM_AUTH_STATUSES:
        return Failure(
            Outcome.UPSTREAM_ERROR, 502, ErrorKind.STATUS, upstream_auth_failed(provider)
        )
    return Failure(Outcome.UPSTREAM_ERROR, status, ErrorKind.STATUS, None)
