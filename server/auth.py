"""Who is calling: the admin token, and tenant API keys (stored hashed, re-read when the file changes)."""

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import Request
from filelock import FileLock
from starlette.types import ASGIApp, Receive, Scope, Send

from .atomic import write_json
from .config import Settings
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
    """Tenant API keys in STATE_DIR/keys.json as sha256 hashes; changes by other processes are seen at once.

    The file is written only once a key is created, so its existence says that keys have ever existed: from then
    on /v1 stays closed, even with every key revoked, unless the mode is "open"."""

    def __init__(self, state_dir: Path, mode: str = "auto"):
        self.path = Path(state_dir) / KEYS_FILE
        self.mode = mode
        self._stamp: tuple[int, int] | None = None
        self._tenants: dict[str, str] = {}  # sha256 -> tenant

    def _read(self) -> dict:
        import json

        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"keys": {}}

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            keys = self._read()["keys"]
            self._tenants = {k["sha256"]: k["tenant"] for k in keys.values()}
            self._stamp = stamp

    def enabled(self) -> bool:
        """Whether /v1 callers need a key."""
        if self.mode != "auto":
            return self.mode == "keys"
        self._refresh()
        return self._stamp is not None

    def tenant_for(self, key: str) -> str | None:
        self._refresh()
        return self._tenants.get(hash_key(key))

    def _change(self, change: Callable[[dict], object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self._read()
            change(data["keys"])
            write_json(self.path, data, mode=0o600)

    def create(self, tenant: str) -> tuple[str, str]:
        """Returns (key id, key); the key itself is shown this once and stored only as a hash."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        self._change(lambda keys: keys.__setitem__(
            key_id, {"tenant": tenant, "sha256": hash_key(key), "created": time.time()}))
        return key_id, key

    def revoke(self, key_id: str) -> bool:
        if not self.path.exists():
            return False
        found = []
        self._change(lambda keys: found.append(keys.pop(key_id, None) is not None))
        return found[0]

    def list(self) -> list[dict]:
        keys = sorted(self._read()["keys"].items(), key=lambda item: item[1]["created"])
        return [{"id": i, "tenant": k["tenant"], "created": k["created"]} for i, k in keys]


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
