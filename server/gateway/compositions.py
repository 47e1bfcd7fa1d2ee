"""Compositions named per request (`"adapter": [{"name", "weight"}, ...]`): resolved to a content-addressed version,
composed and registered the first time, served like any version after; a few kept per tenant."""

import asyncio
import logging
import time
from dataclasses import dataclass, field

from server.core.base_model import BaseModelInfo
from server.core.config import Settings
from server.core.errors import APIError
from server.core.protocol import AdapterWeight
from server.registry import NotFound, Registry, Version
from server.registry.validation import InvalidAdapter
from server.registry.view import RegistryView, Target
from server.weights.compose import ComposeError
from server.registry.refs import COMPOSED_PREFIX
from server.weights.recipes import Part, check_parts, check_weight, composed_name, register_composed

log = logging.getLogger("loraplex.compose")


@dataclass(kw_only=True)
class Compositions:
    """Composes on first use, once per recipe in this gateway, and keeps `max_composed_per_tenant` per tenant."""

    settings: Settings
    base: BaseModelInfo
    registry: Registry
    view: RegistryView
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _used: dict[str, float] = field(default_factory=dict)

    async def resolve(self, recipe: list[AdapterWeight], tenant: str | None) -> Target:
        """The composed version serving `recipe` for the caller's tenant; NotFound for a source it does not own."""
        owner = tenant or "default"
        parts = [Part(await self._source(item.name, tenant), _weight(item.weight, i))
                 for i, item in enumerate(recipe)]
        try:
            check_parts(parts, self.base)
        except ComposeError as e:
            raise APIError(400, f"adapter: {e}", param="adapter", code="invalid_adapter") from None
        name = composed_name(owner, parts)
        self._used[name] = time.monotonic()
        target = await self._served(name, tenant)
        if target is None:
            lock = self._locks.setdefault(name, asyncio.Lock())
            async with lock:
                target = await self._served(name, tenant) or await self._compose(name, parts, owner)
            if not lock.locked():
                self._locks.pop(name, None)
        return target

    async def _source(self, ref: str, tenant: str | None) -> Version:
        """A source version; a tenant's own adapters only (another tenant's, public or not, is missing), any on a
        gateway without keys."""
        try:
            version = (await self.view.resolve(ref, None, tenant)).version
        except NotFound:
            raise NotFound(ref) from None
        if tenant is not None and version.manifest.get("tenant") != tenant:
            raise NotFound(ref)
        return version

    async def _served(self, name: str, tenant: str | None) -> Target | None:
        try:
            return await self.view.resolve(name, None, tenant)
        except NotFound:
            return None

    async def _compose(self, name: str, parts: list[Part], owner: str) -> Target:
        started = time.perf_counter()
        try:
            version = await asyncio.to_thread(
                register_composed, self.registry, name, parts, base=self.base, max_rank=self.settings.max_lora_rank,
                tenant=owner, origin="compose:" + ",".join(f"{p.version.key}:{p.weight}" for p in parts))
        except (ComposeError, InvalidAdapter) as e:
            raise APIError(400, f"adapter: {e}", param="adapter", code="invalid_adapter") from None
        log.info("composed %s for tenant %s from %s in %.3f s", version.key, owner,
                 " + ".join(f"{p.weight} {p.version.key}" for p in parts), time.perf_counter() - started)
        await self.view.areload(name)
        await self._trim(owner, keep=name)
        return Target(version)

    async def _trim(self, owner: str, keep: str) -> None:
        """Deletes the tenant's least recently used compositions past the cap (the engines unload them)."""
        mine = [name for name, entry in self.view.entries.items()
                if name.startswith(COMPOSED_PREFIX) and entry.state.get("tenant") == owner and name != keep]
        excess = len(mine) + 1 - self.settings.max_composed_per_tenant
        for name in sorted(mine, key=lambda n: self._used.get(n, 0.0))[:max(excess, 0)]:
            await asyncio.to_thread(self.registry.delete, name)
            self._used.pop(name, None)
            log.info("deleted composition %s of tenant %s: past LORAPLEX_MAX_COMPOSED_PER_TENANT", name, owner)
            await self.view.areload(name)


def _weight(weight: float, index: int) -> float:
    try:
        return check_weight(weight, f"adapter[{index}]")
    except ComposeError as e:
        raise APIError(400, str(e), param=f"adapter.{index}.weight", code="invalid_value") from None
