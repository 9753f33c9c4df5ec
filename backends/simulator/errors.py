"""Error responses in each engine's own JSON shape.

* OpenAI style (vLLM, SGLang): ``{"object": "error", "message", "type", "param": null, "code"}``
* TGI / TEI style: ``{"error": "...", "error_type": "..."}``
"""

from __future__ import annotations

import enum
from http import HTTPStatus

from aiohttp import web


class ErrorStyle(enum.Enum):
    OPENAI = "openai"
    TGI = "tgi"


class ApiError(Exception):
    """Raised by handlers; the app's middleware renders it in the engine's error shape."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


_OPENAI_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "BadRequestError",
    422: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
_TGI_TYPES = {
    400: "validation",
    404: "not_found",
    413: "validation",
    422: "validation",
    429: "overloaded",
    500: "generation",
    503: "overloaded",
}


def error_body(
    style: ErrorStyle, status: int, message: str, error_type: str | None = None
) -> dict[str, object]:
    if style is ErrorStyle.OPENAI:
        return {
            "object": "error",
            "message": message,
            "type": error_type
            or _OPENAI_TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error"),
            "param": None,
            "code": status,
        }
    return {"error": message, "error_type": error_type or _TGI_TYPES.get(status, "backend")}


def error_response(
    style: ErrorStyle, status: int, message: str, error_type: str | None = None
) -> web.Response:
    return web.json_response(error_body(style, status, message, error_type), status=status)
