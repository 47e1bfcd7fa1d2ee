"""The OpenAI error shape: the one exception a request raises anywhere, and the body it is answered with."""

from fastapi.responses import JSONResponse
from pydantic import BaseModel

# A param names a field; however long the name the caller sent, the answer quotes at most this much of it.
MAX_PARAM_CHARS = 256


class APIError(Exception):
    """Raised anywhere in a request; answered as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# Documented on every route, so the OpenAPI schema (and a fuzzer reading it) knows the error shape.
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Invalid request", 401: "Missing or unknown key", 403: "Not allowed", 404: "Not found",
    409: "Conflict", 413: "Body too large", 429: "Too many requests in flight", 499: "Client closed the request",
    502: "Engine failed", 503: "No engine ready"}.items()}


# Messages may quote what the caller sent; however long that was, the answer stays short.
MAX_MESSAGE_CHARS = 2000


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    param = param[:MAX_PARAM_CHARS] if param else param
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)
