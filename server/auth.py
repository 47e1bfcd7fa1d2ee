"""Who is calling: the admin token, and tenant API keys (stored hashed, shared by every gateway replica)."""

import hashlib
import hmac
import logging
import os
import secrets
import time

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Settings
from .documents import Document, shared_document
from .protocol import APIError, error_response

log = logging.getLogger("loraplex.auth")

KEYS_FILE = "keys.json"
ADMIN_TOKEN_FILE = "admin_token"
KEY_PREFIX = "lpx-"


def hash_key(key: str) -> str:
    # Keys are 256 random bits, so a fast hash is enough; there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def same_secret(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def admin_token(settings: Settings) -> str:
    """The configured admin token, or one generated once into a file only the owner can read."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = settings.state_dir / ADMIN_TOKEN_FILE
    if not path.exists():
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.warning("no LORAPLEX_ADMIN_TOKEN set: generated one in %s (readable by its owner only)", path)
    return path.read_text().strip()


def engine_key(settings: Settings, admin: str) -> str:
    """The credential engines demand of gateways: the configured one, or one derived from the admin token, so a
    gateway and the engines it spawns or is given agree without more setup, and the admin token is not sent."""
    if settings.engine_api_key is not None:
        return settings.engine_api_key.get_secret_value()
    return hmac.new(admin.encode(), b"loraplex engine api key", hashlib.sha256).hexdigest()


class KeyStore:
    """Tenant API keys as sha256 hashes in one shared document (STATE_DIR/keys.json, or beside an object-store
    registry so every gateway replica has the same keys).

    The document is written only once a key is created, so its existence says that keys have ever existed: from
    then on /v1 stays closed, even with every key revoked, unless the mode is "open". A file is re-read whenever it
    changed (a stat per check); a document in the store is re-read by `refresh()`, which a gateway calls every
    REGISTRY_POLL seconds (`follow`), so the request path never waits on the store."""

    def __init__(self, document: Document, mode: str = "auto", follow: bool = False):
        self.document, self.mode, self.follow = document, mode, follow
        self._tag: object = None
        self._tenants: dict[str, str] = {}  # sha256 -> tenant
        if follow:
            self.refresh()

    def refresh(self) -> None:
        tag = self.document.tag()
        if tag != self._tag:
            keys = (self.document.read() or {}).get("keys", {})
            self._tenants = {k["sha256"]: k["tenant"] for k in keys.values()}
            self._tag = tag

    def enabled(self) -> bool:
        """Whether /v1 callers need a key."""
        if self.mode != "auto":
            return self.mode == "keys"
        if not self.follow:
            self.refresh()
        return self._tag is not None

    def tenant_for(self, key: str) -> str | None:
        if not self.follow:
            self.refresh()
        return self._tenants.get(hash_key(key))

    def create(self, tenant: str) -> tuple[str, str]:
        """Returns (key id, key); the key itself is shown this once and stored only as a hash."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        entry = {"tenant": tenant, "sha256": hash_key(key), "created": time.time()}
        self.document.update(lambda data: data.setdefault("keys", {}).__setitem__(key_id, entry))
        return key_id, key

    def revoke(self, key_id: str) -> bool:
        if self.document.tag() is None:
            return False
        found = []
        self.document.update(lambda data: found.append(data.setdefault("keys", {}).pop(key_id, None) is not None))
        return found[0]

    def list(self) -> list[dict]:
        keys = sorted((self.document.read() or {}).get("keys", {}).items(), key=lambda item: item[1]["created"])
        return [{"id": i, "tenant": k["tenant"], "created": k["created"]} for i, k in keys]


def key_store(settings: Settings, follow: bool = False) -> KeyStore:
    """The keys of this deployment: beside an object-store registry (shared by every replica), else in STATE_DIR."""
    shared = settings.registry.startswith("s3://")
    return KeyStore(shared_document(settings.registry, settings.state_dir, KEYS_FILE), settings.auth,
                    follow=follow and shared)


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(request: Request) -> str:
    """FastAPI dependency: the caller, for the audit log; 401 unless it holds the admin token."""
    gw = request.app.state.gateway
    if not same_secret(bearer(request), gw.admin_token):
        raise APIError(401, "a valid admin token is required (Authorization: Bearer <token>)",
                       type="authentication_error", code="invalid_admin_token")
    return f"admin@{request.client.host if request.client else 'unknown'}"


async def caller_tenant(request: Request) -> str | None:
    """FastAPI dependency: the tenant a /v1 caller acts for; None (sees everything) when no keys exist or for
    the admin token. Async, so it runs on the event loop rather than costing every request a thread hop."""
    gw = request.app.state.gateway
    if not gw.keys.enabled():
        return None
    token = bearer(request)
    if token is None:
        raise APIError(401, "an API key is required (Authorization: Bearer <key>)",
                       type="authentication_error", code="missing_api_key")
    if same_secret(token, gw.admin_token):
        return None
    tenant = gw.keys.tenant_for(token)
    if tenant is None:
        raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
    return tenant


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
        gw = scope["app"].state.gateway
        token = _bearer_of(scope)
        if same_secret(token, gw.admin_token) or (not admin and gw.metrics_token
                                                   and same_secret(token, gw.metrics_token)):
            return await self.app(scope, receive, send)
        if admin:
            client = scope.get("client") or ("unknown",)
            await gw.audit.arecord(f"anonymous@{client[0]}", f"{scope['method']} {path[:200]}",
                                   result="refused: invalid admin token")
        what = "a valid admin token" if admin else "the admin or metrics token"
        response = error_response(401, f"{what} is required (Authorization: Bearer <token>)",
                                  type="authentication_error",
                                  code="invalid_admin_token" if admin else "invalid_metrics_token")
        await response(scope, receive, send)


def _bearer_of(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
