"""Compositions named per request (`"adapter": [{"name", "weight"}, ...]`): resolved to a content-addressed version,
composed and registered the first time, served like any version after; a few kept per tenant, audited."""

import asyncio
import logging
import time
from dataclasses import dataclass, field

from server.core.base_model import BaseModelInfo
from server.core.config import Settings
from server.core.errors import APIError
from server.core.protocol import AdapterWeight
from server.data.policy import OPEN_TENANT
from server.observability.audit import AuditLog
from server.registry import NotFound, Registry, Version
from server.registry.refs import COMPOSED_PREFIX
from server.registry.validation import WEIGHTS_FILE, InvalidAdapter
from server.registry.view import RegistryView, Target
from server.weights.compose import ComposeError
from server.weights.recipes import Part, check_parts, check_weight, composed_name, register_composed

log = logging.getLogger("loraplex.compose")
# A composition made or used this recently (by any gateway, as far as its manifest and this gateway know) is never
# trimmed, so a request that just resolved one does not lose it before the engine loads it.
GRACE_SECONDS = 600.0
# Compositions made at once by this gateway: each fetches, concatenates and registers weights.
CONCURRENT = 2


@dataclass(frozen=True)
class Caller:
    """Who asks for a composition: its tenant (None on a gateway without keys), key id and canary key."""

    tenant: str | None
    key_id: str | None
    sticky: str | None


@dataclass(kw_only=True)
class Compositions:
    """Composes on first use (one at a time per recipe in this gateway) and keeps `max_composed_per_tenant` per
    tenant, trimming the least recently used outside a grace period."""

    settings: Settings
    base: BaseModelInfo
    registry: Registry
    view: RegistryView
    audit: AuditLog
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _used: dict[str, float] = field(default_factory=dict)
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONCURRENT))
    _trimming: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def resolve(self, recipe: list[AdapterWeight], caller: Caller) -> Target:
        """The composed version serving `recipe` for the caller's tenant; NotFound for a source it does not own."""
        if caller.tenant is None and caller.key_id is not None:
            raise APIError(400, "adapter: an operator key has no tenant to compose for; use a tenant's key, or "
                                "`loraplex adapters compose`", param="adapter", code="invalid_adapter")
        owner = caller.tenant or OPEN_TENANT
        parts = [Part(await self._source(item.name, i, caller), _weight(item.weight, i))
                 for i, item in enumerate(recipe)]
        try:
            check_parts(parts, self.base, self.settings.max_lora_rank)
        except ComposeError as e:
            raise APIError(400, f"adapter: {e}", param="adapter", code="invalid_adapter") from None
        name = composed_name(owner, parts)
        target = await self._served(name, caller.tenant) or await self._compose_once(name, parts, owner, caller)
        self._used[name] = time.time()
        return target

    async def _compose_once(self, name: str, parts: list[Part], owner: str, caller: Caller) -> Target:
        lock = self._locks.setdefault(name, asyncio.Lock())
        try:
            async with lock:
                return await self._served(name, caller.tenant) or await self._compose(name, parts, owner, caller)
        finally:
            if not lock.locked():
                self._locks.pop(name, None)

    async def _source(self, ref: str, index: int, caller: Caller) -> Version:
        """A source version; a tenant's own adapters only (another tenant's, public or not, is missing), any on a
        gateway without keys."""
        try:
            version = (await self.view.resolve(ref, caller.sticky, caller.tenant)).version
        except NotFound:
            raise NotFound(ref, f"adapter.{index}.name") from None
        if caller.tenant is not None and version.manifest.get("tenant") != caller.tenant:
            raise NotFound(ref, f"adapter.{index}.name")
        return version

    async def _served(self, name: str, tenant: str | None) -> Target | None:
        try:
            return await self.view.resolve(name, None, tenant)
        except NotFound:
            return None

    async def _compose(self, name: str, parts: list[Part], owner: str, caller: Caller) -> Target:
        started = time.perf_counter()
        async with self._slots:
            try:
                version = await asyncio.to_thread(
                    register_composed, self.registry, name, parts, base=self.base,
                    max_rank=self.settings.max_lora_rank, tenant=owner,
                    origin="compose:" + ",".join(f"{p.version.key}:{p.weight}" for p in parts))
            except (ComposeError, InvalidAdapter) as e:
                raise APIError(400, f"adapter: {e}", param="adapter", code="invalid_adapter") from None
        log.info("composed %s for tenant %s from %s in %.3f s", version.key, owner,
                 " + ".join(f"{p.weight} {p.version.key}" for p in parts), time.perf_counter() - started)
        await self.audit.arecord(caller.key_id or "open", "compose_request", name, version.version,
                                 version.manifest["files"][WEIGHTS_FILE]["sha256"], tenant=owner,
                                 recipe=version.manifest["recipe"])
        self._used[name] = time.time()
        await self.view.areload(name)
        await self._trim(owner, keep=name)
        return Target(version)

    async def _trim(self, owner: str, keep: str) -> None:
        """Deletes the tenant's least recently used compositions past the cap, outside the grace period (the
        engines unload them); one trim at a time, and a failed one only logged."""
        async with self._trimming:
            for name in self._victims(owner, keep):
                try:
                    await asyncio.to_thread(self.registry.delete, name)
                except NotFound:
                    continue  # another gateway trimmed it
                except Exception:
                    log.exception("trimming composition %s failed; the next composition tries again", name)
                    return
                self._used.pop(name, None)
                log.info("deleted composition %s of tenant %s: past LORAPLEX_MAX_COMPOSED_PER_TENANT", name, owner)
                await self.audit.arecord("gateway:compositions", "compose_trim", name, tenant=owner)
                await self.view.areload(name)

    def _victims(self, owner: str, keep: str) -> list[str]:
        now, last = time.time(), {}
        for name, entry in self.view.entries.items():
            if name.startswith(COMPOSED_PREFIX) and entry.state.get("tenant") == owner and name != keep:
                created = max((v.manifest.get("created", 0.0) for v in entry.versions.values()), default=0.0)
                last[name] = max(created, self._used.get(name, 0.0))
        excess = len(last) + 1 - self.settings.max_composed_per_tenant
        oldest = sorted(last, key=last.get)[:max(excess, 0)]
        return [name for name in oldest if now - last[name] > GRACE_SECONDS]


def _weight(weight: float, index: int) -> float:
    try:
        return check_weight(weight, f"adapter[{index}]")
    except ComposeError as e:
        raise APIError(400, str(e), param=f"adapter.{index}.weight", code="invalid_value") from None
