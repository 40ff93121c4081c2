"""Errors defined once: start-up configuration errors and OpenAI-shaped API errors."""

from __future__ import annotations

import orjson
from aiohttp import web


class ConfigError(Exception):
    """A bad configuration; the message names the file and the key path."""


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


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)
