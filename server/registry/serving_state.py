"""An adapter's serving state, kept in its state document: aliases and their history, canaries, shadows and
evaluation records; and how a reference resolves against them."""

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from server.registry.refs import LATEST, InvalidReference, NotFound, Ref, Version, check_alias, check_name, parse_ref


@dataclass(frozen=True)
class Entry:
    """One adapter as a reader saw it: its state document and its versions, each with its manifest."""

    state: dict = field(default_factory=dict)
    versions: dict[int, Version] = field(default_factory=dict)


def sticky_share(key: str) -> float:
    """Where `key` falls in [0, 100): the same key always falls in the same place, so a caller's split is stable."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000 / 100


def table_of(versions: list[int], state: dict) -> tuple[dict[str, int], dict[str, dict]]:
    """The aliases that point at a present version, `latest` among them, and the canaries on them."""
    present = set(versions)
    aliases = {a: v for a, v in state.get("aliases", {}).items() if v in present}
    if versions:
        aliases[LATEST] = versions[-1]
    canaries = {a: dict(c) for a, c in state.get("canary", {}).items() if c["version"] in present}
    return aliases, canaries


def pick(ref: Ref, table: tuple[dict[str, int], dict[str, dict]], sticky: str | None) -> int | None:
    """The version an alias reference falls on, or None when the alias does not exist."""
    aliases, canaries = table
    alias = ref.alias or LATEST
    canary = canaries.get(alias)
    if alias not in aliases or canary is None:
        return aliases.get(alias)
    share = sticky_share(f"{ref.name}@{alias}:{sticky}") if sticky else random.uniform(0, 100)
    return canary["version"] if share < canary["weight"] else aliases[alias]


def may_use(state: dict, version: int, tenant: str | None, manifest: Callable[[], dict]) -> bool:
    """Whether `tenant` may use the version: its own adapter's, or a public one (None, an operator: any). A state
    from before it listed public versions leaves it to the version's `manifest`."""
    if tenant is None or state.get("tenant") == tenant:
        return True
    if "public" not in state:
        found = manifest()
        return found.get("tenant") == tenant or bool(found.get("public"))
    return version in state["public"]


class ServingState:
    """Aliases and their history, canaries, shadows and evaluation records, over a registry's `_update_state`,
    `_alias_state` (the stored state as reads see it), `_present` (versions that exist now), `versions` and `get`: one
    implementation for the directory and the object store."""

    def aliases(self, name: str) -> dict[str, int]:
        """Stored aliases that point at an existing version, plus `latest`."""
        return self.alias_table(name)[0]

    def canaries(self, name: str) -> dict[str, dict]:
        """{alias: {"version", "weight"}} for each alias that sends a share of its traffic to another version."""
        return self.alias_table(name)[1]

    def alias_table(self, name: str) -> tuple[dict[str, int], dict[str, dict]]:
        """The aliases and canaries, from one listing and one reading of the state."""
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        return table_of(versions, self._alias_state(name))

    def resolve(self, ref: "Ref | str", sticky: str | None = None, tenant: str | None = None) -> Version:
        """The version a reference names. An alias under a canary answers with the candidate for `weight`% of
        callers: the same `sticky` key always gets the same side while the weight stays put; without one, chance.

        With `tenant`, a version of another tenant's adapter that is not public is not found, decided from the same
        listing and state read as a name that does not exist, so that both answers take the same work."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        present, state = self.versions(ref.name), self._alias_state(ref.name)
        version = ref.version if ref.version is not None else pick(ref, table_of(present, state), sticky)
        if version not in present or not may_use(state, version, tenant, lambda: self.get(ref.name, version).manifest):
            raise NotFound(f"adapter {ref} not found")
        return self.get(ref.name, version)

    def _public(self, name: str, state: dict, versions: list[int]) -> list[int]:
        """The state's public versions; for a state from before it listed them, read off the manifests."""
        if "public" in state:
            return state["public"]
        return [v for v in versions if self.get(name, v).manifest.get("public")]

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Points `alias` at `version`, remembering where it pointed so that rollback can return there; a canary on
        the alias ends."""
        check_alias(alias)
        self.get(name, version)

        def change(state: dict) -> None:
            previous = state.setdefault("aliases", {}).get(alias)
            if previous is not None and previous != version:
                state.setdefault("alias_history", {}).setdefault(alias, []).append(previous)
            state["aliases"][alias] = version
            state.get("canary", {}).pop(alias, None)

        self._update_state(name, change)

    def rollback(self, name: str, alias: str = "stable") -> int:
        """Moves `alias` back to the most recent earlier version that still exists; returns it."""
        present = self._present(check_name(name))
        if not present:
            raise NotFound(f"adapter {name!r} not found")
        result = {}

        def change(state: dict) -> None:
            history = state.setdefault("alias_history", {}).get(alias, [])
            while history and history[-1] not in present:
                history.pop()
            if alias not in state.setdefault("aliases", {}) or not history:
                raise NotFound(f"alias {alias!r} of {name!r} has no earlier version to roll back to")
            result["version"] = state["aliases"][alias] = history.pop()
            state.get("canary", {}).pop(alias, None)

        self._update_state(name, change)
        return result["version"]

    def set_canary(self, name: str, alias: str, version: int, weight: float) -> None:
        """Sends `weight`% of `alias`'s callers to `version`, the rest to the version the alias points at."""
        check_alias(alias)
        if not 0 < weight < 100:
            raise InvalidReference(f"weight {weight}: must be more than 0 and less than 100 (use promote for 100)",
                                   "weight")
        self.get(name, version)

        def change(state: dict) -> None:
            current = state.setdefault("aliases", {}).get(alias)
            if current is None:
                raise NotFound(f"alias {alias!r} of {name!r} points at no version: set it before a canary", "alias")
            if current == version:
                raise InvalidReference(f"{name}@{alias} already points at version {version}", "version")
            state.setdefault("canary", {})[alias] = {"version": version, "weight": weight}

        self._update_state(name, change)

    def promote(self, name: str, alias: str = "stable") -> int:
        """Points `alias` at its canary's version, for all callers; returns it."""
        canary = self._end_canary(name, alias)
        self.set_alias(name, alias, canary["version"])
        return canary["version"]

    def abort(self, name: str, alias: str = "stable") -> int:
        """Ends `alias`'s canary: every caller gets the version the alias points at, which is returned."""
        self._end_canary(name, alias)
        return self.aliases(name)[alias]

    def shadows(self, name: str) -> dict[str, dict]:
        """{alias: {"version", "percent"}}: the version that gets a copy of `percent`% of the alias's requests, from
        one read of the stored state and no listing; a caller checks the version exists."""
        return {a: dict(s) for a, s in self._alias_state(name).get("shadow", {}).items()}

    def set_shadow(self, name: str, alias: str, version: int, percent: float) -> None:
        """Sends a copy of `percent`% of `alias`'s requests to `version`, whose answers are compared, not served."""
        check_alias(alias)
        if not 0 < percent <= 100:
            raise InvalidReference(f"percent {percent}: must be more than 0 and at most 100", "percent")
        self.get(name, version)

        def change(state: dict) -> None:
            if state.setdefault("aliases", {}).get(alias) is None:
                raise NotFound(f"alias {alias!r} of {name!r} points at no version: set it first", "alias")
            state.setdefault("shadow", {})[alias] = {"version": version, "percent": percent}

        self._update_state(name, change)

    def end_shadow(self, name: str, alias: str) -> None:
        def change(state: dict) -> None:
            if state.get("shadow", {}).pop(alias, None) is None:
                raise NotFound(f"alias {alias!r} of {name!r} has no shadow", "alias")

        self._update_state(check_name(name), change)

    def evaluations(self, name: str) -> dict[int, dict]:
        """{version: its latest evaluation's summary}. Kept beside the immutable manifest: a version can be evaluated
        again, on other data or against another reference."""
        return {int(v): dict(e) for v, e in self._alias_state(name).get("evaluations", {}).items()}

    def record_evaluation(self, name: str, version: int, summary: dict) -> None:
        self.get(name, version)
        self._update_state(name, lambda state: state.setdefault("evaluations", {}).__setitem__(str(version), summary))

    def _end_canary(self, name: str, alias: str) -> dict:
        ended = {}

        def change(state: dict) -> None:
            canary = state.get("canary", {}).pop(alias, None)
            if canary is None:
                raise NotFound(f"alias {alias!r} of {name!r} has no canary", "alias")
            ended.update(canary)

        self._update_state(check_name(name), change)
        return ended
