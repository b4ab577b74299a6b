"""Errors in OpenAI's JSON shape, so the official client raises its own typed exceptions
(``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ...) with our message.

Every failure a request can meet is an ``APIError`` carrying its status; the app turns it,
and FastAPI's validation errors, into ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastapi.responses import JSONResponse

INVALID = "invalid_request_error"
SERVER = "server_error"


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, kind: str = INVALID,
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.kind, self.param, self.code = kind, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def validation_error(errors: Sequence[Mapping]) -> APIError:
    """One 400 from pydantic's error list: the first problem, named by its field."""
    if not errors:
        return bad_request("the request body is invalid")
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return bad_request("the request body is not valid JSON: send a JSON object with "
                           "Content-Type: application/json")
    if first.get("type") == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param)
    if first.get("type") == "missing":
        return bad_request(f"missing required parameter: {param}", param)
    message = str(first.get("msg", "invalid value"))
    return bad_request(f"{param}: {message}" if param else message, param)
