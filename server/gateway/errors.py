"""Every error leaves the gateway as an OpenAI error body: ours, the registry's and the framework's."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.core.errors import APIError, error_response
from server.core.protocol import ADAPTER_FORMS
from server.registry import Conflict, NotFound, RegistryError, Unavailable


def registry_error(e: RegistryError) -> APIError:
    """The one mapping of the registry's errors to answers."""
    if isinstance(e, NotFound):
        return APIError(404, str(e), type="not_found_error", param=e.param, code="adapter_not_found")
    if isinstance(e, Conflict):
        return APIError(409, str(e), param=e.param, code="adapter_conflict")
    if isinstance(e, Unavailable):
        return APIError(503, str(e), type="server_error", code="registry_unavailable")
    return APIError(400, str(e), param=e.param, code="invalid_reference")


def _param(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "body" and p not in ADAPTER_FORMS) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return registry_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            return error_response(400, f"request body is not valid JSON: {reason}".rstrip(": "), code="invalid_json")
        param = _param(first.get("loc", ()))
        return error_response(400, f"{param}: {first.get('msg')}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind)
