"""classify(): one outcome/status/kind/error per exception and phase."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.billing.record import ErrorKind
from proxy.config.model import Timeouts
from proxy.contract.outcome import Outcome
from proxy.upstream.failures import CLIENT_LEFT, Failure, Phase, classify, status_failure
from proxy.upstream.watchdog import Watchdog

PROVIDER = "acme"
BOUND = 5.0


async def classify_our_timeout(phase: Phase, sent_status: int = 0) -> Failure | None:
    """classify() of the CancelledError a real Watchdog expiry (first byte) raises."""

    async def task() -> Failure | None:
        wd = Watchdog(Timeouts(first_byte=0.05, idle=10.0, total=20.0))
        try:
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError as exc:
            return classify(exc, wd, PROVIDER, phase, sent_status)
        finally:
            wd.cancel()
        raise AssertionError("the watchdog did not fire")

    return await asyncio.wait_for(task(), BOUND * 2)


async def classify_now(exc: BaseException, phase: Phase, sent_status: int = 0) -> Failure | None:
    """classify() with a Watchdog that has not expired."""
    wd = Watchdog(Timeouts())
    try:
        return classify(exc, wd, PROVIDER, phase, sent_status)
    finally:
        wd.cancel()


async def test_our_timeout_in_head_is_504_waiting_for_the_head() -> None:
    failure = await classify_our_timeout(Phase.HEAD)
    assert failure is not None and failure.error is not None
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.TIMEOUT,
        504,
        ErrorKind.TIMEOUT,
    )
    assert failure.error.status == 504
    assert failure.error.code == "upstream_timeout"
    assert "first byte, waiting for the response head" in failure.error.message
    assert PROVIDER in failure.error.message


async def test_our_timeout_in_body_is_504() -> None:
    failure = await classify_our_timeout(Phase.BODY)
    assert failure is not None and failure.error is not None
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.TIMEOUT,
        504,
        ErrorKind.TIMEOUT,
    )
    assert failure.error.code == "upstream_timeout"
    assert "response head" not in failure.error.message


async def test_our_timeout_in_stream_keeps_the_status_already_sent() -> None:
    failure = await classify_our_timeout(Phase.STREAM, sent_status=200)
    assert failure is not None and failure.error is not None
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.TIMEOUT,
        200,
        ErrorKind.TIMEOUT,
    )
    assert failure.error.code == "upstream_timeout"


@pytest.mark.parametrize("phase", list(Phase))
async def test_a_cancellation_that_is_not_ours_means_the_client_left(phase: Phase) -> None:
    failure = await classify_now(asyncio.CancelledError(), phase, 200)
    assert failure is CLIENT_LEFT
    assert (failure.outcome, failure.status, failure.kind, failure.error) == (
        Outcome.CLIENT_ABORTED,
        499,
        None,
        None,
    )


@pytest.mark.parametrize(
    "exc", [TimeoutError(), aiohttp.ServerTimeoutError("connect")], ids=["timeout", "aiohttp"]
)
async def test_connect_timeout_in_head_is_504(exc: BaseException) -> None:
    failure = await classify_now(exc, Phase.HEAD)
    assert failure is not None and failure.error is not None
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.TIMEOUT,
        504,
        ErrorKind.TIMEOUT,
    )
    assert failure.error.code == "upstream_timeout"
    assert "connect" in failure.error.message


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "refused"),
        aiohttp.ClientOSError(104, "reset"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionResetError("reset"),
        OSError("no route"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_connect_errors_in_head_are_502_unavailable(exc: BaseException) -> None:
    failure = await classify_now(exc, Phase.HEAD)
    assert failure is not None and failure.error is not None
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.UPSTREAM_ERROR,
        502,
        ErrorKind.CONNECT,
    )
    assert failure.error.status == 502
    assert failure.error.code == "upstream_unavailable"
    assert type(exc).__name__ in failure.error.message


@pytest.mark.parametrize(
    "exc",
    [aiohttp.ClientPayloadError("truncated"), aiohttp.ServerDisconnectedError(), OSError()],
    ids=lambda e: type(e).__name__,
)
async def test_read_errors_in_body_are_502(exc: BaseException) -> None:
    failure = await classify_now(exc, Phase.BODY)
    assert failure is not None and failure.error is not None
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.UPSTREAM_ERROR,
        502,
        ErrorKind.MID_STREAM,
    )
    assert failure.error.code == "upstream_unavailable"
    assert "while sending the response" in failure.error.message


async def test_a_reset_while_reading_the_body_is_the_upstream_not_the_client() -> None:
    # In BODY nothing is written to the client, so a reset can only be the upstream's.
    failure = await classify_now(ConnectionResetError(), Phase.BODY)
    assert failure is not None
    assert failure.outcome is Outcome.UPSTREAM_ERROR and failure.status == 502


@pytest.mark.parametrize(
    "exc",
    [aiohttp.ClientPayloadError("truncated"), aiohttp.ServerDisconnectedError()],
    ids=lambda e: type(e).__name__,
)
async def test_read_errors_mid_stream_keep_the_sent_status(exc: BaseException) -> None:
    failure = await classify_now(exc, Phase.STREAM, sent_status=200)
    assert failure is not None and failure.error is not None
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.UPSTREAM_ERROR,
        200,
        ErrorKind.MID_STREAM,
    )
    assert failure.error.code == "upstream_stream_error"
    assert "mid-stream" in failure.error.message


@pytest.mark.parametrize(
    "exc",
    [ConnectionResetError(), aiohttp.ClientConnectionResetError("closing transport")],
    ids=lambda e: type(e).__name__,
)
async def test_client_write_errors_in_stream_mean_the_client_left(exc: BaseException) -> None:
    assert await classify_now(exc, Phase.STREAM, sent_status=200) is CLIENT_LEFT


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize(
    "exc", [ValueError("bug"), KeyError("x"), RuntimeError("bug")], ids=lambda e: type(e).__name__
)
async def test_other_exceptions_are_not_upstream_failures(exc: BaseException, phase: Phase) -> None:
    assert await classify_now(exc, phase, 200) is None


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_status_failure_relays_the_upstream_status(status: int) -> None:
    failure = status_failure(status, "p")
    assert (failure.outcome, failure.status, failure.kind, failure.error) == (
        Outcome.UPSTREAM_ERROR,
        status,
        ErrorKind.STATUS,
        None,
    )


@pytest.mark.parametrize("status", [401, 403])
def test_status_failure_of_our_key_refused_is_a_neutral_502(status: int) -> None:
    failure = status_failure(status, "p")
    assert (failure.outcome, failure.status, failure.kind) == (
        Outcome.UPSTREAM_ERROR,
        502,
        ErrorKind.STATUS,
    )
    assert failure.error is not None and failure.error.code == "upstream_auth_failed"
