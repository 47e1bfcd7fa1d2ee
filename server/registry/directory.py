"""The adapter registry: versioned PEFT adapters with manifests and aliases, written atomically.

Layout: ROOT/NAME/VERSION/{adapter_config.json, adapter_model.safetensors, manifest.json} and
ROOT/NAME/state.json (aliases, next version). A version directory appears by one rename, complete.
"""

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from server.core.atomic import fsync_dir, write_json
from server.core.base_model import BaseModel
from server.registry.validation import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, check_adapter, shown

if TYPE_CHECKING:
    from server.registry.s3 import S3Registry

NAME_PATTERN = "^[a-z0-9][a-z0-9._-]{0,63}$"
# Aliases start with a letter so that "name@3" is always a version and "name@stable" an alias.
ALIAS_PATTERN = "^[a-z][a-z0-9._-]{0,63}$"
# Python's $ also matches before a final newline ("acme\n"), so these match with fullmatch.
NAME_RE = re.compile(NAME_PATTERN.strip("^$"))
ALIAS_RE = re.compile(ALIAS_PATTERN.strip("^$"))
# ASCII digits only: str.isdigit() also takes "²", "١" and "１".
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
MAX_VERSION = 2**31 - 1
LATEST = "latest"
STATE_FILE = "state.json"


class RegistryError(Exception):
    """Base of the registry's errors; `param` names the input at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidReference(RegistryError, ValueError):
    """An adapter reference or name that does not parse."""


class NotFound(RegistryError, LookupError):
    """No such adapter, version or alias."""


class Conflict(RegistryError):
    """The name cannot be taken, or the change conflicts with the registry's state."""


def unavailable(name: str) -> str:
    """Why a name another tenant owns cannot be registered; it says no more, so as not to tell that it exists."""
    return f"adapter name {name!r} is not available: choose another"


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    path: Path | None  # its directory, in a directory registry
    manifest: dict

    @property
    def key(self) -> str:
        """The name the version is loaded under in an engine, and answered as."""
        return f"{self.name}@{self.version}"


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidReference(f"invalid adapter {what} {shown(str(name))}: must match {NAME_PATTERN}", what)
    return name


def check_version(version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise NotFound(f"no version {str(version)[:20]}: versions run from 1 to {MAX_VERSION}")
    return version


def parse_ref(text: str) -> Ref:
    """Parses "name", "name@3" or "name@alias"."""
    if not isinstance(text, str):
        raise InvalidReference("adapter must be a string")
    name, sep, selector = text.partition("@")
    check_name(name)
    if not sep:
        return Ref(name)
    if VERSION_RE.fullmatch(selector) and int(selector) <= MAX_VERSION:
        return Ref(name, version=int(selector))
    if ALIAS_RE.fullmatch(selector):
        return Ref(name, alias=selector)
    raise InvalidReference(f"invalid adapter reference {shown(text)}: expected name, name@VERSION or name@ALIAS")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage(files: Path, staging: Path, base: BaseModel, max_rank: int, **fields: object) -> dict:
    """Copies the adapter's files into `staging` and validates the copy, so what is checked is what is published;
    returns the version's manifest, less its number and time, with `fields` added."""
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if (files / fname).is_file():
            shutil.copyfile(files / fname, staging / fname)
    info = check_adapter(staging, base, max_rank)
    hashes = {}
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        with open(staging / fname, "rb") as f:
            os.fsync(f.fileno())
        hashes[fname] = {"sha256": sha256_file(staging / fname), "size": (staging / fname).stat().st_size}
    return {"base_model": base.name, "base_fingerprint": base.fingerprint, "declared_base_model": info.declared_base,
            "rank": info.rank, "alpha": info.alpha, "target_modules": info.target_modules, "files": hashes,
            **fields}


def manifest_problems(where: str, manifest: dict, name: str, version: str, sizes: dict[str, int],
                      digest: Callable[[str], str]) -> list[str]:
    """What is wrong with a stored version, given its files' sizes and a way to hash one of them."""
    problems = []
    if manifest.get("name") != name or str(manifest.get("version")) != version:
        problems.append(f"{where}: manifest names {manifest.get('name')}@{manifest.get('version')}")
    for fname, meta in manifest.get("files", {}).items():
        if fname not in sizes:
            problems.append(f"{where}: {fname} is missing")
        elif sizes[fname] != meta.get("size") or digest(fname) != meta.get("sha256"):
            problems.append(f"{where}: {fname} does not match its sha256 in the manifest")
    if set(manifest.get("files", {})) != {CONFIG_FILE, WEIGHTS_FILE}:
        problems.append(f"{where}: manifest does not list {CONFIG_FILE} and {WEIGHTS_FILE}")
    return problems


def open_registry(location: str | Path, max_age: float = 1.0) -> "Registry | S3Registry":
    """The registry at a directory or at s3://BUCKET/PREFIX (whose reads may be `max_age` seconds old); boto3 is
    imported only for the latter."""
    if str(location).startswith("s3://"):
        from server.registry.s3 import S3Registry

        return S3Registry(str(location), max_age=max_age)
    return Registry(Path(location))


def sticky_share(key: str) -> float:
    """Where `key` falls in [0, 100): the same key always falls in the same place, so a caller's split is stable."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000 / 100


def _table(versions: list[int], state: dict) -> tuple[dict[str, int], dict[str, dict]]:
    """The aliases that point at a present version, `latest` among them, and the canaries on them."""
    present = set(versions)
    aliases = {a: v for a, v in state.get("aliases", {}).items() if v in present}
    if versions:
        aliases[LATEST] = versions[-1]
    canaries = {a: dict(c) for a, c in state.get("canary", {}).items() if c["version"] in present}
    return aliases, canaries


def _pick(ref: Ref, table: tuple[dict[str, int], dict[str, dict]], sticky: str | None) -> int | None:
    """The version an alias reference falls on, or None when the alias does not exist."""
    aliases, canaries = table
    alias = ref.alias or LATEST
    canary = canaries.get(alias)
    if alias not in aliases or canary is None:
        return aliases.get(alias)
    share = sticky_share(f"{ref.name}@{alias}:{sticky}") if sticky else random.uniform(0, 100)
    return canary["version"] if share < canary["weight"] else aliases[alias]


class AliasTable:
    """Aliases, their history and their canaries, over a registry's `_update_state`, `_alias_state` (the stored
    state as reads see it), `_present` (versions that exist now), `versions` and `get`: one implementation for the
    directory and the object store."""

    def aliases(self, name: str) -> dict[str, int]:
        """Stored aliases that point at an existing version, plus `latest`."""
        return self.alias_table(name)[0]

    def canaries(self, name: str) -> dict[str, dict]:
        """{alias: {"version", "weight"}} for each alias that sends a share of its traffic to another version."""
        return self.alias_table(name)[1]

    def alias_table(self, name: str) -> tuple[dict[str, int], dict[str, dict]]:
        """The aliases and canaries, from one listing and one reading of the state (resolve is on the request path)."""
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        return _table(versions, self._alias_state(name))

    def resolve(self, ref: "Ref | str", sticky: str | None = None, tenant: str | None = None) -> Version:
        """The version a reference names. An alias under a canary answers with the candidate for `weight`% of
        callers: the same `sticky` key always gets the same side while the weight stays put; without one, chance.

        With `tenant`, a version of another tenant's adapter that is not public is not found, decided from the same
        listing and state read as a name that does not exist, so that both answers take the same work."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        present, state = self.versions(ref.name), self._alias_state(ref.name)
        version = ref.version if ref.version is not None else _pick(ref, _table(present, state), sticky)
        if version not in present or not self._usable(ref.name, version, state, tenant):
            raise NotFound(f"adapter {ref} not found")
        return self.get(ref.name, version)

    def _usable(self, name: str, version: int, state: dict, tenant: str | None) -> bool:
        if tenant is None or state.get("tenant") == tenant:
            return True
        if "public" not in state:  # a state from before it listed public versions, or not read yet: the manifest
            manifest = self.get(name, version).manifest
            return manifest.get("tenant") == tenant or bool(manifest.get("public"))
        return version in state["public"]

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
        """{alias: {"version", "percent"}}: the version that gets a copy of `percent`% of the alias's requests. One
        read of the stored state and no listing, since the request path asks; a caller checks the version exists."""
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


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or alias == LATEST:
        raise InvalidReference(f"invalid alias {shown(str(alias))}: must match {ALIAS_PATTERN} and not be "
                               f"{LATEST!r}", "alias")
    return alias


class Registry(AliasTable):
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._manifests: dict[tuple[str, int, int], dict] = {}

    def refresh(self) -> dict[str, list[int]]:
        """Every name's versions; a directory is read live, so there is no snapshot to renew."""
        if not self.root.is_dir():
            return {}
        listed = {p.name: self.versions(p.name) for p in self.root.iterdir() if NAME_RE.fullmatch(p.name)}
        return {name: versions for name, versions in listed.items() if versions}

    def fetch(self, version: Version, dest: Path) -> None:
        """Copies the version's adapter files into the directory `dest`; NotFound if it was deleted meanwhile."""
        try:
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(version.path / fname, dest / fname)
        except FileNotFoundError:
            raise NotFound(f"{version.key} was deleted") from None

    def state(self, name: str) -> dict:
        return self._state(check_name(name))

    def set_state(self, name: str, state: dict) -> None:
        """Replaces the owner and aliases of `name` with a copied registry's (`registry copy`)."""
        self._update_state(name, lambda current: current.update(state))

    def adopt(self, version: Version, files: Path) -> None:
        """Stores a copy of another registry's version under the same number (`registry copy`)."""
        adapter_dir = self.root / version.name
        adapter_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=adapter_dir))
        staging.chmod(0o755)
        try:
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(files / fname, staging / fname)
            write_json(staging / MANIFEST_FILE, version.manifest)
            fsync_dir(staging)
            with FileLock(adapter_dir / ".lock"):
                if (adapter_dir / str(version.version)).exists():
                    raise Conflict(f"{version.key} already exists in {self.root}")
                os.rename(staging, adapter_dir / str(version.version))
                fsync_dir(adapter_dir)
                state = self._state(version.name)
                state["next_version"] = max(state.get("next_version", 1), version.version + 1)
                write_json(adapter_dir / STATE_FILE, state)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.fullmatch(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        try:
            entries = os.scandir(self.root / check_name(name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            return sorted(int(e.name) for e in entries if VERSION_RE.fullmatch(e.name) and e.is_dir())

    def _state(self, name: str) -> dict:
        try:
            return json.loads((self.root / name / STATE_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {"aliases": {}, "next_version": 1}

    def get(self, name: str, version: int) -> Version:
        path = self.root / check_name(name) / str(check_version(version))
        try:
            stamp = (path / MANIFEST_FILE).stat().st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"adapter {name}@{version} not found") from None
        # Versions are immutable once renamed into place, so a manifest read once stays valid.
        manifest = self._manifests.get((name, version, stamp))
        if manifest is None:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            self._manifests[(name, version, stamp)] = manifest
        return Version(name, version, path, manifest)

    def register(self, name: str, source: Path, *, base: BaseModel, max_rank: int, tenant: str = "default",
                 origin: str = "cli", public: bool = False, extra: dict | None = None) -> Version:
        """Copies, validates and publishes `source` as the next version of `name`; all or nothing."""
        check_name(name)
        check_name(tenant, "tenant")
        adapter_dir = self.root / name
        adapter_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=adapter_dir))
        staging.chmod(0o755)  # mkdtemp makes it private; engines may run as another user
        try:
            manifest = stage(Path(source), staging, base, max_rank, name=name, tenant=tenant, source=origin,
                             public=public, **(extra or {}))
            with FileLock(adapter_dir / ".lock"):
                version = self._publish(name, staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(name, version)

    def _publish(self, name: str, staging: Path, manifest: dict) -> int:
        """Numbers the staged version and renames it into place; the caller holds the adapter's lock."""
        adapter_dir = self.root / name
        state = self._state(name)
        owner = state.get("tenant")
        # Owned until the whole adapter is deleted (as on object storage): a name whose versions were deleted one
        # by one keeps its owner, and with it its aliases and rollout records, which no other tenant may inherit.
        if owner is not None and owner != manifest["tenant"]:
            raise Conflict(unavailable(name), "name")
        version = max([state.get("next_version", 1), *(v + 1 for v in self.versions(name))])
        write_json(staging / MANIFEST_FILE, {**manifest, "version": version, "created": time.time()})
        fsync_dir(staging)
        os.rename(staging, adapter_dir / str(version))
        fsync_dir(adapter_dir)
        public = {*self._public(name, state, self.versions(name)), *([version] if manifest.get("public") else [])}
        state.update(next_version=version + 1, tenant=manifest["tenant"], public=sorted(public))
        write_json(adapter_dir / STATE_FILE, state)
        return version

    def _update_state(self, name: str, change: Callable[[dict], None]) -> dict:
        """Applies `change(state)` under the adapter's lock and writes the state atomically."""
        adapter_dir = self.root / check_name(name)
        with FileLock(adapter_dir / ".lock"):
            state = self._state(name)
            change(state)
            write_json(adapter_dir / STATE_FILE, state)
        return state

    def _alias_state(self, name: str) -> dict:
        return self._state(name)

    def _present(self, name: str) -> set[int]:
        return set(self.versions(name))

    def tenant(self, name: str) -> str | None:
        return self._state(check_name(name)).get("tenant")

    def delete_version(self, name: str, version: int) -> None:
        """Hides a version at once by renaming it aside, then removes it (engines serve their own copies)."""
        self.get(name, version)
        with FileLock(self.root / name / ".lock"):
            trash = self._trash(name, version)
        shutil.rmtree(trash, ignore_errors=True)

    def _trash(self, name: str, version: int) -> Path:
        adapter_dir = self.root / name
        trash = adapter_dir / f".trash-{version}-{os.urandom(4).hex()}"
        try:
            os.rename(adapter_dir / str(version), trash)
        except FileNotFoundError:
            raise NotFound(f"adapter {name}@{version} not found") from None
        fsync_dir(adapter_dir)
        return trash

    def delete(self, name: str) -> list[int]:
        """Hides every version; the name becomes free but its version numbers are never reused.

        One hold of the adapter's lock from listing to clearing the owner: a registration cannot land between
        them and survive with no owner, for another tenant to take."""
        adapter_dir = self.root / check_name(name)
        if not self.versions(name):
            raise NotFound(f"adapter {name!r} not found")
        with FileLock(adapter_dir / ".lock"):
            versions = self.versions(name)
            if not versions:
                raise NotFound(f"adapter {name!r} not found")
            trashed = [(v, self._trash(name, v)) for v in versions]
            state = self._state(name)
            state.update(aliases={}, alias_history={})
            state.pop("tenant", None)
            write_json(adapter_dir / STATE_FILE, state)
        for _, trash in trashed:
            shutil.rmtree(trash, ignore_errors=True)
        return [version for version, _ in trashed]

    def check(self) -> tuple[list[str], list[str]]:
        """Verifies every version's manifest and file hashes; returns (problems, notes)."""
        problems, notes = [], []
        if not self.root.is_dir():
            return problems, notes
        for adapter_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not NAME_RE.fullmatch(adapter_dir.name):
                notes.append(f"{adapter_dir.name}: not an adapter name, ignored")
                continue
            for entry in sorted(adapter_dir.iterdir()):
                if entry.name.startswith((".staging-", ".trash-")):
                    notes.append(f"{adapter_dir.name}/{entry.name}: leftover of an interrupted write or delete "
                                 "(invisible; safe to remove)")
                elif VERSION_RE.fullmatch(entry.name):
                    problems += self._check_version(adapter_dir.name, entry)
        return problems, notes

    @staticmethod
    def _check_version(name: str, path: Path) -> list[str]:
        where = f"{name}@{path.name}"
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as e:
            return [f"{where}: manifest unreadable: {e}"]
        sizes = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
        return manifest_problems(where, manifest, name, path.name, sizes, lambda fname: sha256_file(path / fname))
