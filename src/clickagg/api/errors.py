"""Error answers: always JSON ``{"error", "detail"}``, always naming what is wrong."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers
        self.extra = extra or {}


def bad_request(detail: str, error: str = "invalid request") -> ApiError:
    return ApiError(400, error, detail)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    body = {"error": exc.error, "detail": exc.detail, **exc.extra}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": "http error", "detail": exc.detail}, status_code=exc.status_code)
