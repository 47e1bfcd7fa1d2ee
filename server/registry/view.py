"""The registry as a gateway serves from it: every adapter's versions, state and manifests in memory, renewed in the
background, so that a request for a version already seen costs no file-system or object-store read."""

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

from server.core.periodic import every
from server.registry import LATEST, NotFound, Ref, Registry, RegistryError, Unavailable, Version, parse_ref
from server.registry.serving_state import Entry, may_use, pick, table_of

log = logging.getLogger("loraplex.registry")

@dataclass(frozen=True)
class Target:
    """What an adapter reference resolved to: the version that serves it, and the version a shadow copies it to with
    the percent copied (when the reference named an alias with a shadow on another version)."""

    version: Version
    shadow: tuple[float, Version] | None = None


def decide(ref: Ref, entry: Entry, sticky: str | None, tenant: str | None) -> Target | None:
    """The target `ref` names in `entry`, with its canary side picked by `sticky`; None when there is none for
    `tenant` (a missing version or alias and another tenant's adapter alike)."""
    number = ref.version if ref.version is not None else pick(ref, table_of(sorted(entry.versions), entry.state),
                                                               sticky)
    if number not in entry.versions:
        return None
    if not may_use(entry.state, number, tenant, lambda: entry.versions[number].manifest):
        return None
    shadow = None if ref.version is not None else entry.state.get("shadow", {}).get(ref.alias or LATEST)
    copy = None
    if shadow is not None and shadow["version"] != number and shadow["version"] in entry.versions:
        copy = (shadow["percent"], entry.versions[shadow["version"]])
    return Target(entry.versions[number], copy)


def _gone(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    """The versions in `before` that `after` lacks; an adapter whose reading was kept (the same entry) is skipped."""
    gone = []
    for name, entry in before.items():
        now = after.get(name)
        if now is not entry:
            gone += [f"{name}@{v}" for v in entry.versions.keys() - (now.versions.keys() if now else set())]
    return gone


class RegistryView:
    """Every adapter as last read; `keep_current` renews it every `poll` seconds and reports deleted versions. A name,
    version or alias not in it (or not the caller's) is looked up in the registry before it is refused: its state
    first, the same one read whether the name is missing or another tenant's, then the whole adapter if the caller
    may use it."""

    def __init__(self, registry: Registry, poll: float, on_deleted: Callable[[list[str]], None]):
        self.registry, self.poll, self.on_deleted = registry, poll, on_deleted
        self.entries: dict[str, Entry] = {}
        self._read_at: dict[str, float] = {}  # when the reading in place of a name began, if it was read alone
        self._all_read_at = -math.inf  # when the whole registry's reading in place began
        self._lock = threading.Lock()  # readings land one at a time (they run in threads)
        # The background reading has a thread of its own: lookups and other work cannot hold it back.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="registry-view")
        self._loop: asyncio.AbstractEventLoop | None = None

    def refresh(self) -> list[str]:
        """Reads the whole registry again (a thread's work); returns the versions gone since the last reading."""
        started = time.monotonic()
        entries = self.registry.read_all()
        with self._lock:
            newer = {name: at for name, at in self._read_at.items() if at > started}
            for name in newer:  # read alone since this reading began: that reading stands
                entries.pop(name, None)
                if name in self.entries:
                    entries[name] = self.entries[name]
            gone = _gone(self.entries, entries)
            self.entries, self._read_at, self._all_read_at = entries, newer, started
        return gone

    def reload(self, name: str) -> list[str]:
        """Reads one adapter again (a thread's work): after a write through this gateway, or for a name or version
        not seen; returns its versions gone since the last reading. A reading that began before the one in place
        is dropped."""
        started = time.monotonic()
        entry = self.registry.entry(name)
        with self._lock:
            if started < max(self._read_at.get(name, -math.inf), self._all_read_at):
                return []
            self._read_at[name] = started
            gone = _gone({name: self.entries.get(name, Entry())}, {name: entry})
            if entry.versions:
                self.entries[name] = entry
            else:
                self.entries.pop(name, None)
        return gone

    async def areload(self, name: str) -> list[str]:
        """Reads one adapter again and reports its versions gone; on the event loop. Returns them too."""
        gone = await asyncio.to_thread(self.reload, name)
        if gone:
            self.on_deleted(gone)
        return gone

    def changed(self, name: str) -> None:
        """Called from any thread after a write through this gateway (a rollout's step): the adapter is read again."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.areload(name)))

    async def resolve(self, text: str, sticky: str | None, tenant: str | None) -> Target:
        """The target of the reference `text`, parsed once: from memory, or after a lookup in the registry."""
        ref = parse_ref(text)
        entry = self.entries.get(ref.name)
        target = decide(ref, entry, sticky, tenant) if entry is not None else None
        if target is None:
            target = await self._look_up(ref, sticky, tenant)
        if target is None:
            raise NotFound(f"adapter {ref} not found")
        return target

    async def _look_up(self, ref: Ref, sticky: str | None, tenant: str | None) -> Target | None:
        try:
            if not await asyncio.to_thread(self._may_use, ref.name, tenant):
                return None
            await self.areload(ref.name)
        except RegistryError:
            raise
        except Exception as e:
            log.warning("looking up %s in the registry failed: %s", ref, e)
            raise Unavailable("the adapter registry could not be read; try again") from None
        entry = self.entries.get(ref.name)
        return decide(ref, entry, sticky, tenant) if entry is not None else None

    def _may_use(self, name: str, tenant: str | None) -> bool:
        """Whether `tenant` may use some version of the adapter, from its stored state alone: one read, the same
        whether the name is missing or another tenant's, so the answer does not tell which."""
        state = self.registry.state(name)
        # A state from before it listed public versions: the manifests (read by the reload) say.
        return tenant is None or state.get("tenant") == tenant or bool(state.get("public", "tenant" in state))

    async def keep_current(self) -> None:
        """Renews the view every `poll` seconds, so that changes made through other gateways or the CLI take effect
        here and versions deleted anywhere are reported."""
        self._loop = asyncio.get_running_loop()
        await every(self.poll, self._renew, "reading the registry failed; serving from the last reading")

    async def _renew(self) -> None:
        gone = await asyncio.get_running_loop().run_in_executor(self._reader, self.refresh)
        if gone:
            self.on_deleted(gone)
