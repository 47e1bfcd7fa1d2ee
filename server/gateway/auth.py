"""Who may call what, at the door: the bearer check on /admin and /metrics before a byte of the body is read, and
the /v1 caller's tenant."""

from dataclasses import dataclass

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.core.errors import APIError, error_response
from server.observability.audit import AuditLog
from server.tenancy.keys import Caller, KeyStore, identify, same_secret


@dataclass(kw_only=True)
class Access:
    """What the door checks callers against."""

    keys: KeyStore
    admin_token: str
    metrics_token: str | None
    audit: AuditLog


def bearer(scope: Scope) -> str | None:
    """The bearer token of a request's Authorization header, or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def admin_caller(request: Request) -> Caller:
    """FastAPI dependency: the /admin caller, which the Credentials middleware identified and let through."""
    return request.state.caller


async def v1_caller(request: Request) -> Caller | None:
    """FastAPI dependency: who a /v1 request acts as; None when no keys exist (open). Async, so it runs on the event
    loop rather than costing every request a thread hop."""
    access: Access = request.app.state.access
    if not access.keys.enabled():
        return None
    token = bearer(request.scope)
    if token is None:
        raise APIError(401, "an API key is required (Authorization: Bearer <key>)",
                       type="authentication_error", code="missing_api_key")
    caller = identify(token, access.admin_token, access.keys)
    if caller is None:
        raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
    return caller


async def caller_tenant(request: Request) -> str | None:
    """FastAPI dependency: the tenant a /v1 caller acts for; None (sees everything) when no keys exist or for
    an operator."""
    caller = await v1_caller(request)
    return caller.tenant if caller else None


class Credentials:
    """ASGI middleware: a bearer check on /admin and /metrics before the app reads a byte of the body.

    A FastAPI dependency runs only after the body is parsed, and for an upload that means spooled to disk."""

    def __init__(self, app: ASGIApp, guard_admin: bool):
        self.app, self.guard_admin = app, guard_admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        admin = self.guard_admin and (path == "/admin" or path.startswith("/admin/"))
        if not admin and not (path == "/metrics" or path.startswith("/metrics/")):
            return await self.app(scope, receive, send)
        access: Access = scope["app"].state.access
        token = bearer(scope)
        caller = identify(token, access.admin_token, access.keys)
        if not admin:
            if (caller is not None and caller.role == "admin") or (access.metrics_token
                                                                     and same_secret(token, access.metrics_token)):
                return await self.app(scope, receive, send)
            response = error_response(401, "the admin or metrics token is required (Authorization: Bearer <token>)",
                                      type="authentication_error", code="invalid_metrics_token")
            return await response(scope, receive, send)
        if caller is not None and caller.role != "inference":
            scope.setdefault("state", {})["caller"] = caller
            return await self.app(scope, receive, send)
        client = scope.get("client") or ("unknown",)
        if caller is None:
            actor, result = f"anonymous@{client[0]}", "refused: invalid admin token"
            response = error_response(401, "an admin token or key is required (Authorization: Bearer <token>)",
                                      type="authentication_error", code="invalid_admin_token")
        else:
            actor, result = caller.actor, "refused: an inference key"
            response = error_response(403, "this key may only call /v1 (its role is inference)",
                                      type="permission_error", code="insufficient_role")
        await access.audit.arecord(actor, f"{scope['method']} {path[:200]}", result=result,
                                   tenant=caller and caller.tenant)
        await response(scope, receive, send)
