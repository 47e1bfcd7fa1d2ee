"""The one door of a loraplex engine: nothing answers without the engine key but liveness, and adapters reach vLLM
only through loraplex's resolver.

vLLM's own key check guards only its /v1, /v2, /inference and /cohere routes; with runtime LoRA updating on (which is
what makes vLLM ask resolvers) its other routes let anyone who reaches the engine run any tenant's adapter
(/invocations), register other weights under a tenant's name (POST /adapters, /v1/load_lora_adapter) or read its
metrics. Loaded into vLLM's API server with `--middleware server.vllm_plugins.engine_guard.EngineGuard`; the key is VLLM_API_KEY,
which loraplex sets in every engine's environment."""

import hashlib
import os
import secrets

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Liveness: answers "up" and nothing else, for probes that hold no key (Kubernetes').
OPEN = frozenset({"/health"})
# Loading adapters by path, by anyone: loraplex's resolver is the only way in. Unloading stays open to the key's
# holders at /v1/unload_lora_adapter (gateways unload a deleted version there).
REFUSED = ("/v1/load_lora_adapter", "/invocations", "/adapters")


class EngineGuard:
    """Pure ASGI middleware in front of every route vLLM serves, whatever the route."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.key = hashlib.sha256(os.environ["VLLM_API_KEY"].encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in OPEN and scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if not self._holds_key(Headers(scope=scope)):
            return await _refuse(scope, receive, send, 401, "the engine key is required")
        if path.startswith(REFUSED):
            return await _refuse(scope, receive, send, 403, "adapters are loaded only by loraplex's resolver")
        return await self.app(scope, receive, send)

    def _holds_key(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(given, self.key)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    error = {"error": {"message": message, "type": "permission_error" if status == 403 else "authentication_error",
                       "param": None, "code": status}}
    await JSONResponse(error, status_code=status)(scope, receive, send)
