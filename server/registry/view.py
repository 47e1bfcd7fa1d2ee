"""The registry as a gateway serves from it: every adapter's versions, state and manifests in memory, renewed in the
background, so that a request for a version already seen costs no file-system or object-store read."""

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.core.periodic import every
from server.registry import LATEST, NotFound, Ref, Registry, Version, parse_ref
from server.registry.serving_state import Entry, pick, table_of

@dataclass(frozen=True)
class Target:
    """What an adapter reference resolved to: the version that serves it, and the version a shadow copies it to with
    the percent copied (when the reference named an alias with a shadow on another version)."""

    version: Version
    shadow: tuple[float, Version] | None = None


def usable(entry: Entry, version: int, tenant: str | None) -> bool:
    """Whether `tenant` may use the version: its own adapter's, or a public one (None: an operator, any)."""
    if tenant is None or entry.state.get("tenant") == tenant:
        return True
    if "public" not in entry.state:  # a state from before it listed public versions: the manifest says
        manifest = entry.versions[version].manifest
        return manifest.get("tenant") == tenant or bool(manifest.get("public"))
    return version in entry.state["public"]


def decide(ref: Ref, entry: Entry, sticky: str | None, tenant: str | None) -> Target | None:
    """The target `ref` names in `entry`, with its canary side picked by `sticky`; None when there is none for
    `tenant` (a missing version or alias and another tenant's adapter alike)."""
    numbers = sorted(entry.versions)
    number = ref.version if ref.version is not None else pick(ref, table_of(numbers, entry.state), sticky)
    if number not in entry.versions or not usable(entry, number, tenant):
        return None
    shadow = None if ref.version is not None else entry.state.get("shadow", {}).get(ref.alias or LATEST)
    copy = None
    if shadow is not None and shadow["version"] != number and shadow["version"] in entry.versions:
        copy = (shadow["percent"], entry.versions[shadow["version"]])
    return Target(entry.versions[number], copy)


def _gone(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    return [f"{name}@{v}" for name, entry in before.items()
            for v in entry.versions.keys() - after.get(name, Entry()).versions.keys()]


class RegistryView:
    """Every adapter as last read; `keep_current` renews it every `poll` seconds and reports deleted versions. A name,
    version or alias not in it (or not the caller's) is read once more from the registry before it is refused, so
    a foreign adapter is refused after the same reads as a missing one."""

    def __init__(self, registry: Registry, poll: float, on_deleted: Callable[[list[str]], None]):
        self.registry, self.poll, self.on_deleted = registry, poll, on_deleted
        self.entries: dict[str, Entry] = {}
        self._read_at: dict[str, float] = {}  # when a name was last read alone (reload)
        self._lock = threading.Lock()  # readings land one at a time (they run in threads)

    def refresh(self) -> list[str]:
        """Reads the whole registry again (a thread's work); returns the versions gone since the last reading."""
        started = time.monotonic()
        entries = self.registry.read_all()
        with self._lock:
            # A name read alone since this reading began (a write through this gateway) keeps that newer reading.
            for name, at in self._read_at.items():
                if at >= started:
                    entries.pop(name, None)
                    if name in self.entries:
                        entries[name] = self.entries[name]
            gone = _gone(self.entries, entries)
            self.entries, self._read_at = entries, {}
        return gone

    def reload(self, name: str) -> list[str]:
        """Reads one adapter again (a thread's work): after a write through this gateway, or a name not seen;
        returns its versions gone since the last reading."""
        read_at = time.monotonic()
        entry = self.registry.entry(name)
        with self._lock:
            self._read_at[name] = read_at
            gone = _gone({name: self.entries.get(name, Entry())}, {name: entry})
            if entry.versions:
                self.entries[name] = entry
            else:
                self.entries.pop(name, None)
        return gone

    async def areload(self, name: str) -> None:
        """Reads one adapter again and reports its versions gone; on the event loop."""
        gone = await asyncio.to_thread(self.reload, name)
        if gone:
            self.on_deleted(gone)

    async def resolve(self, text: str, sticky: str | None, tenant: str | None) -> Target:
        """The target of the reference `text`, parsed once: from memory, or after one read of its adapter."""
        ref = parse_ref(text)
        entry = self.entries.get(ref.name)
        target = decide(ref, entry, sticky, tenant) if entry is not None else None
        if target is None and await asyncio.to_thread(self._may_use, ref.name, tenant):
            await self.areload(ref.name)
            entry = self.entries.get(ref.name)
            target = decide(ref, entry, sticky, tenant) if entry is not None else None
        if target is None:
            raise NotFound(f"adapter {ref} not found")
        return target

    def _may_use(self, name: str, tenant: str | None) -> bool:
        """Whether the adapter, as stored now, has a version `tenant` may use: decided from its listing and state
        alone, the same reads whether the name is missing or another tenant's, so neither answer tells which."""
        versions, state = self.registry.listing(name)
        if not versions:
            return False
        # A state from before it listed public versions: the manifests (read by the reload) say.
        return tenant is None or state.get("tenant") == tenant or bool(state.get("public", True))

    async def keep_current(self) -> None:
        """Renews the view every `poll` seconds, so that changes made through other gateways or the CLI take effect
        here and versions deleted anywhere are reported."""
        await every(self.poll, self._renew, "reading the registry")

    async def _renew(self) -> None:
        gone = await asyncio.to_thread(self.refresh)
        if gone:
            self.on_deleted(gone)
