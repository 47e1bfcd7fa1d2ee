"""Who is calling: the admin token, and API keys with a role (stored hashed, shared by every gateway replica)."""

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass

from server.core.config import Settings
from server.core.periodic import every
from server.store.documents import Document, shared_document
from server.store.location import is_object_store

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

    async def keep_current(self, poll: float) -> None:
        """Reads the shared keys every `poll` seconds, so a key made or revoked on another replica counts here."""
        await every(poll, lambda: asyncio.to_thread(self.refresh), "reading the keys failed; checking callers against the last reading")

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
    shared = is_object_store(settings.registry)
    return KeyStore(shared_document(settings.registry, settings.state_dir, KEYS_FILE), settings.auth,
                    follow=follow and shared)


def identify(token: str | None, admin: str, keys: KeyStore) -> Caller | None:
    """The caller a bearer token stands for, or None."""
    if token is None:
        return None
    if same_secret(token, admin):
        return ADMIN_TOKEN_CALLER
    return keys.caller_for(token)
