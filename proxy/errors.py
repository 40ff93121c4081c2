"""Errors defined once: the configuration error and every OpenAI-shaped API error.

Every error a caller can get is built by one of the functions below, so its
status, type and code are spelled in one place.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A bad configuration; the message names the file and the key path. The CLI
    prints it as one line and exits 2."""


class StartupError(Exception):
    """A runtime failure that stops a command (a port taken, a host that does not
    resolve); the CLI prints it as one line and exits 1."""


class LedgerNotMigrated(Exception):
    """The ledger database lacks the schema this code needs (`llm-proxy ledger migrate`)."""


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape.

    Raised anywhere on the request path; the error middleware turns it into
    `{"error": {"message", "type", "code", "param"}}` with `status`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=self.headers,
        )


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "code": code, "param": param}})


# -- the caller's request -----------------------------------------------------------


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


def unsupported_media_type(mime: str) -> ApiError:
    return ApiError(
        415,
        f"Content-Type must be application/json, got {mime[:100]!r}",
        code="unsupported_media_type",
    )


def request_too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
    )


def unsupported_parameter(param: str, message: str) -> ApiError:
    """A request field the alias does not price (proxy.billing.price_params)."""
    return ApiError(400, message, code="unsupported_parameter", param=param[:100])


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model[:200]}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def unsupported_endpoint(alias: str, endpoint: str, served: list[str]) -> ApiError:
    """The alias does not serve this API (its `endpoints`, see GET /v1/models)."""
    return ApiError(
        400,
        f"model '{alias[:200]}' does not serve /v1/{endpoint.replace('.', '/')} "
        f"(it serves: {', '.join(served) or 'nothing'})",
        code="unsupported_endpoint",
        param="model",
    )


def responses_unsupported(alias: str, provider: str) -> ApiError:
    """The alias's provider only speaks chat completions (`responses: false`)."""
    return ApiError(
        400,
        f"model '{alias[:200]}' is served by provider {provider!r}, which does not speak "
        "the Responses API (responses: false); call /v1/chat/completions instead "
        "(the proxy does not translate between the two APIs)",
        code="unsupported_endpoint",
        param="model",
    )


def response_alias_required() -> ApiError:
    """GET/DELETE /v1/responses/{id}: no alias named, and no single provider to ask."""
    return ApiError(
        400,
        "name the model alias that created this response: ?model=<alias> "
        "or the header X-Model-Alias (several providers serve the Responses API)",
        code="missing_required_parameter",
        param="model",
    )


# -- who pays ---------------------------------------------------------------------


def invalid_user(param: str) -> ApiError:
    """A payer id that is not canonical (see proxy.billing.payer.parse_user_id)."""
    return ApiError(
        400,
        f"{param} must be a user id: ASCII decimal digits without sign or leading zero",
        code="invalid_user",
        param=param,
    )


def unauthorized(message: str, *, invalid_token: bool) -> ApiError:
    challenge = 'Bearer error="invalid_token"' if invalid_token else "Bearer"
    return ApiError(
        401,
        message,
        type="invalid_request_error",  # what OpenAI answers for bad keys
        code="invalid_api_key",
        headers={"WWW-Authenticate": challenge},
    )


def forbidden(message: str, param: str | None = None) -> ApiError:
    return ApiError(403, message, type="permission_error", code="permission_denied", param=param)


def auth_unavailable() -> ApiError:
    return ApiError(
        503,
        "API key verification is temporarily unavailable, please retry",
        type="service_unavailable",
        code="auth_unavailable",
        headers={"Retry-After": "1"},
    )


def insufficient_credit(
    available: int | None = None, held: int = 0, cost: int | None = None
) -> ApiError:
    """What a refused admission is answered with; a reservation says how much credit
    is available (net of what the user's requests in progress hold) and what this
    request may cost."""
    if available is None or cost is None:
        message = "Your credit balance is insufficient for this request. Please top up and retry."
    else:
        free = available - held
        message = (
            f"Your credit balance is insufficient for this request: {free} credits "
            f"available ({available} balance"
            + (f", {held} held by requests in progress" if held else "")
            + f"), this request may cost up to {cost}. Lower max_completion_tokens, "
            "or top up and retry."
        )
    return ApiError(
        402,
        message,
        type="insufficient_quota",
        code="credit_balance_insufficient",
    )


# -- the credit API (proxy.ledger.credit_api) ------------------------------------------


def not_found(what: str, code: str = "not_found") -> ApiError:
    return ApiError(404, what, code=code)


def conflict(message: str, code: str) -> ApiError:
    return ApiError(409, message, code=code)


def idempotency_key_required() -> ApiError:
    return ApiError(
        400,
        "send an Idempotency-Key header (1-128 visible ASCII characters): "
        "retrying with the same key returns the same order",
        code="idempotency_key_required",
        param="Idempotency-Key",
    )


def bad_signature(message: str) -> ApiError:
    """A payment webhook whose X-Signature is missing, malformed or wrong."""
    return ApiError(
        401, message, type="invalid_request_error", code="invalid_signature", param="X-Signature"
    )


def ledger_unavailable(what: str = "ledger database") -> ApiError:
    return ApiError(
        503,
        f"the {what} is temporarily unavailable, please retry",
        type="service_unavailable",
        code="ledger_unavailable",
        headers={"Retry-After": "1"},
    )


def request_id_in_use() -> ApiError:
    """Admission: the payer already holds credit under this X-Request-Id (a request
    in flight, or one whose charge the ledger has not applied yet)."""
    return ApiError(
        409,
        "Another request with this X-Request-Id is in progress; use a new request id",
        type="invalid_request_error",
        code="request_id_in_use",
        param="X-Request-Id",
    )


def guard_unavailable() -> ApiError:
    """Admission could not reach Redis or the books and `guard.fail` is closed."""
    return ApiError(
        503,
        "Credit checks are temporarily unavailable, please retry",
        type="service_unavailable",
        code="credit_guard_unavailable",
        headers={"Retry-After": "1"},
    )


# -- the upstream -----------------------------------------------------------------


def credentials_missing(provider: str, variable: str) -> ApiError:
    return ApiError(
        503,
        f"provider {provider!r} has no API key: set the environment variable {variable}",
        type="server_error",
        code="upstream_credentials_missing",
    )


def _upstream(status: int, provider: str, what: str, code: str) -> ApiError:
    """Every upstream error names the provider and says what happened."""
    return ApiError(
        status, f"upstream provider {provider!r} {what}", type="upstream_error", code=code
    )


def upstream_unavailable(provider: str, what: str) -> ApiError:
    return _upstream(502, provider, f"is unavailable ({what})", "upstream_unavailable")


def upstream_timeout(provider: str, what: str) -> ApiError:
    return _upstream(504, provider, f"timed out ({what})", "upstream_timeout")


def upstream_auth_failed(provider: str) -> ApiError:
    """The provider refused *our* key (its 401/403): not the caller's fault, and
    its wording (which may quote our key or account) is not relayed."""
    return _upstream(
        502,
        provider,
        "could not be used; the proxy's operators are notified",
        "upstream_auth_failed",
    )


# Anything that looks like a credential in an upstream error body: OpenAI-style
# keys (sk-..., sk-proj-...) and bearer tokens. The character classes stop at
# quotes and backslashes, so a JSON body stays valid JSON after redaction.
_SECRET_RES = (
    (re.compile(rb"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-.*]{3,}"), b"sk-[redacted]"),
    (re.compile(rb"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-*]+"), b"Bearer [redacted]"),
)


def redact_secrets(body: bytes, *secrets: str | None) -> bytes:
    """`body` with every key-like string (and each given secret) replaced."""
    for secret in secrets:
        if secret and len(secret) >= 8:
            body = body.replace(secret.encode(), b"[redacted]")
    for pattern, replacement in _SECRET_RES:
        body = pattern.sub(replacement, body)
    return body


def upstream_status_body(status: int, body: bytes, *secrets: str | None) -> bytes:
    """The upstream's error body when it is OpenAI-shaped JSON (key-like strings
    removed), else wrapped into that shape."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        cleaned = redact_secrets(body, *secrets)
        try:
            orjson.loads(cleaned)
        except orjson.JSONDecodeError:  # redaction broke an odd escape: say less
            return error_body(
                f"upstream returned HTTP {status}",
                type="upstream_error",
                code=f"upstream_http_{status}",
            )
        return cleaned
    return error_body(
        f"upstream returned HTTP {status}", type="upstream_error", code=f"upstream_http_{status}"
    )


# -- the proxy itself ----------------------------------------------------------------

HTTP_CODES = {
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
}


def internal_error() -> ApiError:
    return ApiError(500, "internal error in the proxy", type="server_error", code="internal_error")


def upstream_read_failed(provider: str, what: str, *, streaming: bool) -> ApiError:
    """The connection broke while the body was read (502, or an SSE error event)."""
    if streaming:
        return _upstream(502, provider, f"failed mid-stream ({what})", "upstream_stream_error")
    return _upstream(
        502, provider, f"failed while sending the response ({what})", "upstream_unavailable"
    )


def upstream_busy(retry_after_s: int = 1) -> ApiError:
    """Every target of the alias is at its `max_concurrency` (after `max_wait_ms`)."""
    return ApiError(
        503,
        "every upstream serving this model is at capacity; retry shortly",
        type="server_error",
        code="upstream_busy",
        headers={"Retry-After": str(retry_after_s)},
    )


def upstream_failed_status(provider: str, status: int) -> ApiError:
    """Every attempt failed and the last one's retryable status (429, 5xx) was not
    kept to relay (a later target could not be tried)."""
    return _upstream(status, provider, f"failed (HTTP {status})", "upstream_error")


def rate_limited(what: str, retry_after_s: int) -> ApiError:
    """Over a `limits:` rate (requests or tokens per minute, concurrency)."""
    return ApiError(
        429,
        f"Rate limit reached for {what}. Please retry after {retry_after_s}s.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


def rate_limit_unavailable() -> ApiError:
    """The rate limiter could not decide in time and `limits.fail_open` is false."""
    return ApiError(
        503,
        "rate limits cannot be checked right now; retry shortly",
        type="server_error",
        code="rate_limit_unavailable",
        headers={"Retry-After": "1"},
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape, never as a stack trace or HTML page."""
    try:
        return await handler(request)
    except ApiError as err:
        return err.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, etype = HTTP_CODES.get(exc.status, ("http_error", "invalid_request_error"))
        message = exc.reason if exc.status != 404 else f"unknown route {request.path!r}"
        if exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path!r}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.Response(
            status=exc.status,
            body=error_body(message, etype, code),
            content_type="application/json",
            headers=headers,
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return internal_error().response()
