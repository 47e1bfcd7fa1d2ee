"""Who is calling: the admin token, and API keys with a role (stored hashed, shared by every gateway replica)."""

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.core.config import Settings
from server.store.documents import Document, shared_document
from server.core.protocol import APIError, error_response

log = logging.getLogger("loraplex.auth")

KEYS_FILE = "keys.json"
ADMIN_TOKEN_FILE = "admin_token"
KEY_PREFIX = "lpx-"
# inference: /v1 for its tenant; tenant-admin: also /admin for its tenant's adapters; admin: an operator, everything.
ROLES = ("inference", "tenant-admin", "admin")


@dataclass(frozen=True)
class Caller:
    """Whom a request acts as: a key, by id and name (never its secret), or the admin token."""

    key_id: str
    role: str
    tenant: str | None = None  # None: every tenant (operators)
    name: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names it."""
        return f"{self.key_id} ({self.name})" if self.name else self.key_id


ADMIN_TOKEN_CALLER = Caller("admin-token", "admin")


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
        self._callers: dict[str, Caller] = {}  # sha256 -> its caller
        if follow:
            self.refresh()

    def refresh(self) -> None:
        tag = self.document.tag()
        if tag != self._tag:
            keys = (self.document.read() or {}).get("keys", {})
            self._callers = {k["sha256"]: Caller(key_id, k.get("role", "inference"), k.get("tenant"), k.get("name"))
                             for key_id, k in keys.items()}
            self._tag = tag

    def enabled(self) -> bool:
        """Whether /v1 callers need a key."""
        if self.mode != "auto":
            return self.mode == "keys"
        if not self.follow:
            self.refresh()
        return self._tag is not None

    def caller_for(self, key: str) -> Caller | None:
        if not self.follow:
            self.refresh()
        return self._callers.get(hash_key(key))

    def create(self, tenant: str | None, role: str = "inference", name: str | None = None) -> tuple[str, str]:
        """Returns (key id, key); the key itself is shown this once and stored only as a hash. An operator key
        (role admin) has a name and no tenant; the others have a tenant. Raises ValueError naming the option."""
        if role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}")
        if (role == "admin") != (tenant is None):
            raise ValueError("tenant: an operator key has none" if tenant else f"tenant: a {role} key needs one")
        if role == "admin" and not name:
            raise ValueError("name: an operator key needs a name, for the audit log")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        entry = {"tenant": tenant, "role": role, "name": name, "sha256": hash_key(key), "created": time.time()}

        def add(data: dict) -> None:
            keys = data.setdefault("keys", {})
            if name and any(k.get("name") == name for k in keys.values()):
                raise ValueError(f"name: a key named {name!r} exists; revoke it first")
            keys[key_id] = entry

        self.document.update(add)
        return key_id, key

    def revoke(self, key: str) -> str | None:
        """Revokes a key by id or by name; returns the id, or None when there is no such key."""
        if self.document.tag() is None:
            return None
        found: list[str] = []

        def remove(data: dict) -> None:
            keys = data.setdefault("keys", {})
            match = key if key in keys else next((i for i, k in keys.items() if k.get("name") == key), None)
            if match is not None:
                del keys[match]
                found.append(match)

        self.document.update(remove)
        return found[0] if found else None

    def list(self) -> list[dict]:
        keys = sorted((self.document.read() or {}).get("keys", {}).items(), key=lambda item: item[1]["created"])
        return [{"id": i, "tenant": k.get("tenant"), "role": k.get("role", "inference"), "name": k.get("name"),
                 "created": k["created"]} for i, k in keys]


def key_store(settings: Settings, follow: bool = False) -> KeyStore:
    """The keys of this deployment: beside an object-store registry (shared by every replica), else in STATE_DIR."""
    shared = settings.registry.startswith("s3://")
    return KeyStore(shared_document(settings.registry, settings.state_dir, KEYS_FILE), settings.auth,
                    follow=follow and shared)


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def identify(token: str | None, admin: str, keys: KeyStore) -> Caller | None:
    """The caller a bearer token stands for, or None."""
    if token is None:
        return None
    if same_secret(token, admin):
        return ADMIN_TOKEN_CALLER
    return keys.caller_for(token)


def admin_caller(request: Request) -> Caller:
    """FastAPI dependency: the /admin caller, which the Credentials middleware identified and let through."""
    return request.state.caller


async def caller_tenant(request: Request) -> str | None:
    """FastAPI dependency: the tenant a /v1 caller acts for; None (sees everything) when no keys exist or for
    an operator. Async, so it runs on the event loop rather than costing every request a thread hop."""
    gw = request.app.state.gateway
    if not gw.keys.enabled():
        return None
    token = bearer(request)
    if token is None:
        raise APIError(401, "an API key is required (Authorization: Bearer <key>)",
                       type="authentication_error", code="missing_api_key")
    caller = identify(token, gw.admin_token, gw.keys)
    if caller is None:
        raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
    return caller.tenant


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
        caller = identify(token, gw.admin_token, gw.keys)
        if not admin:
            if (caller is not None and caller.role == "admin") or (gw.metrics_token
                                                                     and same_secret(token, gw.metrics_token)):
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
        await gw.audit.arecord(actor, f"{scope['method']} {path[:200]}", result=result, tenant=caller and caller.tenant)
        await response(scope, receive, send)


def _bearer_of(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None
