"""The adapter registry on S3-compatible object storage, with the directory registry's guarantees from conditional
writes instead of file locks and renames.

Layout under s3://BUCKET/PREFIX/:
  NAME/state.json  owner, aliases and their history; created with If-None-Match: *, moved with If-Match on its ETag
  NAME/claims/V    allocates version V (If-None-Match: *); kept for ever, so V is never given out again
  NAME/V/adapter_config.json, NAME/V/adapter_model.safetensors, then NAME/V/manifest.json (If-None-Match: *):
                   a version exists once its manifest does, so it is visible only complete; deleting its manifest
                   hides it at once.
"""

import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from server.core.base_model import BaseModelInfo
from server.registry.manifest import manifest_problems, stage
from server.registry.refs import (
    NAME_RE,
    STATE_FILE,
    VERSION_RE,
    Conflict,
    NotFound,
    RegistryError,
    Version,
    check_name,
    check_version,
    unavailable,
)
from server.registry.serving_state import Entry, ServingState
from server.registry.validation import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from server.store.bucket import MAX_RACES, Bucket, Precondition

CLAIMS = "claims"


def _no_state() -> dict:
    """The state of a name that has none yet."""
    return {"aliases": {}}


class S3Registry(ServingState):
    """Same interface and guarantees as `DirectoryRegistry`. Reads see a snapshot at most `max_age` seconds old; a
    gateway's registry view renews it (`read_all`) in the background."""

    def __init__(self, url: str, client: Any = None, max_age: float = 1.0):
        self.store = Bucket(url, client)
        self.root = self.store.url
        self.max_age = max_age
        self._manifests: dict[tuple[str, int], dict] = {}  # immutable once written, so fetched once
        self._snapshot: dict[str, list[int]] = {}
        self._states: dict[str, dict] = {}
        self._writes: dict[tuple[str, int], tuple[float, dict | None]] = {}  # own publishes (manifest), deletes (None)
        self._taken = -float("inf")
        self._lock = threading.Lock()

    # Reads, from a snapshot of the listing

    def refresh(self) -> dict[str, list[int]]:
        """Lists the registry again, reading the states and any new manifests; returns every name's versions."""
        started = time.monotonic()
        versions: dict[str, list[int]] = {}
        for key, _ in self.store.keys():
            name, _, rest = key.partition("/")
            number, _, fname = rest.partition("/")
            if NAME_RE.fullmatch(name) and VERSION_RE.fullmatch(number) and fname == MANIFEST_FILE:
                versions.setdefault(name, []).append(int(number))
        states = {name: self._read_state(name)[0] for name in versions}
        listed = {(name, v) for name, numbers in versions.items() for v in numbers}
        manifests = {k: m for k, m in self._manifests.items() if k in listed}
        for name, number in listed - manifests.keys():
            got = self.store.get(f"{name}/{number}/{MANIFEST_FILE}")
            if got is not None:
                manifests[(name, number)] = json.loads(got[0])
        with self._lock:
            # This process's own writes since the listing began may be missing from it: they stand.
            self._writes = {k: w for k, w in self._writes.items() if w[0] >= started}
            for (name, number), (_, manifest) in self._writes.items():
                listed = set(versions.get(name, []))
                versions[name] = [*(listed | {number})] if manifest else [*(listed - {number})]
                if manifest:
                    manifests[(name, number)] = manifest
            self._snapshot = {n: sorted(v) for n, v in versions.items() if v}
            self._states, self._manifests, self._taken = states, manifests, time.monotonic()
        return self._snapshot

    def _fresh(self) -> bool:
        return time.monotonic() - self._taken <= self.max_age

    def _view(self) -> dict[str, list[int]]:
        return self._snapshot if self._fresh() else self.refresh()

    def names(self) -> list[str]:
        return sorted(self._view())

    def versions(self, name: str) -> list[int]:
        return list(self._view().get(check_name(name), []))

    def get(self, name: str, version: int) -> Version:
        """From the snapshot while it is fresh (no store call); else from the store."""
        check_name(name)
        check_version(version)
        if self._fresh():
            manifest = self._manifests.get((name, version))
        else:
            got = self.store.get(f"{name}/{version}/{MANIFEST_FILE}")
            manifest = json.loads(got[0]) if got else None
        if manifest is None:
            raise NotFound(f"adapter {name}@{version} not found")
        return Version(name, version, None, manifest)

    def tenant(self, name: str) -> str | None:
        return self._read_state(check_name(name))[0].get("tenant")

    def fetch(self, version: Version, dest: Path) -> None:
        """Downloads the version's adapter files into the directory `dest`; NotFound if it was deleted meanwhile."""
        try:
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                self.store.download(f"{version.name}/{version.version}/{fname}", dest / fname)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise NotFound(f"{version.key} was deleted") from None
            raise

    # Writes, each decided by one conditional write

    def _read_state(self, name: str) -> tuple[dict, str | None]:
        got = self.store.get(f"{name}/{STATE_FILE}")
        if got is None:
            return _no_state(), None
        return json.loads(got[0]), got[1]

    def _update_state(self, name: str, change: Callable[[dict], None]) -> dict:
        """Applies `change(state)` and writes it only if nobody wrote the state meanwhile; retries if somebody did."""
        state = self.store.update_json(f"{name}/{STATE_FILE}", change, absent=_no_state)
        if state is None:
            raise RegistryError(f"the state of adapter {name!r} kept changing; try again")
        with self._lock:
            self._states[name] = state
        return state

    def read_all(self) -> dict[str, Entry]:
        """Every adapter with a version, from a new reading of the store."""
        self.refresh()
        with self._lock:
            return {name: Entry(self._states.get(name, {}), {v: Version(name, v, None, self._manifests[(name, v)])
                                                             for v in numbers if (name, v) in self._manifests})
                    for name, numbers in self._snapshot.items()}

    def listing(self, name: str) -> tuple[list[int], dict]:
        """The adapter's versions and state as the store holds them now."""
        return self._stored_versions(check_name(name)), self._read_state(name)[0]

    def entry(self, name: str) -> Entry:
        """The adapter as the store holds it now: a listing, its state, and the manifests not read before."""
        numbers, state = self.listing(name)
        versions = {}
        for number in numbers:
            manifest = self._manifests.get((name, number))
            if manifest is None:
                got = self.store.get(f"{name}/{number}/{MANIFEST_FILE}")
                manifest = json.loads(got[0]) if got else None
            if manifest is not None:
                versions[number] = Version(name, number, None, manifest)
        return Entry(state, versions)

    def _stored_versions(self, name: str) -> list[int]:
        """Versions with a manifest in the store now (not the snapshot)."""
        found = []
        for key, _ in self.store.keys(f"{name}/"):
            number, _, fname = key[len(name) + 1:].partition("/")
            if VERSION_RE.fullmatch(number) and fname == MANIFEST_FILE:
                found.append(int(number))
        return sorted(found)

    def _claim_owner(self, name: str, tenant: str) -> None:
        """Takes the name for `tenant` unless another tenant owns it. The owner is also read off the newest stored
        version: a whole-name delete racing a registration can leave a version while clearing the state's owner,
        and that must not let another tenant take the name."""
        def change(state: dict) -> None:
            stored = self._stored_versions(name)
            got = self.store.get(f"{name}/{stored[-1]}/{MANIFEST_FILE}") if stored else None
            owners = {state.get("tenant"), json.loads(got[0]).get("tenant") if got else None} - {None}
            if owners - {tenant}:
                raise Conflict(unavailable(name), "name")
            state["tenant"] = tenant
            state["public"] = self._public(name, state, stored)

        self._update_state(name, change)

    def _claim_version(self, name: str) -> int:
        claimed = [int(k.rsplit("/", 1)[1]) for k, _ in self.store.keys(f"{name}/{CLAIMS}/")
                   if VERSION_RE.fullmatch(k.rsplit("/", 1)[1])]
        version = max([0, *claimed, *self._stored_versions(name)]) + 1
        for _ in range(MAX_RACES):
            try:
                self.store.put(f"{name}/{CLAIMS}/{version}", b"", create=True)
                return version
            except Precondition:
                version += 1
        raise RegistryError(f"could not allocate a version of {name!r}; try again")

    def register(self, name: str, source: Path, *, base: BaseModelInfo, max_rank: int, tenant: str = "default",
                 origin: str = "cli", public: bool = False, extra: dict | None = None) -> Version:
        """Validates `source`, then claims the owner and the next version, uploads the files and, last, the
        manifest that makes the version exist."""
        check_name(name)
        check_name(tenant, "tenant")
        with tempfile.TemporaryDirectory(prefix="loraplex-stage-") as staging:
            manifest = stage(Path(source), Path(staging), base, max_rank, name=name, tenant=tenant, source=origin,
                             public=public, **(extra or {}))
            self._claim_owner(name, tenant)
            version = self._claim_version(name)
            self._publish(name, version, Path(staging), {**manifest, "version": version, "created": time.time()})
        if public:  # listed after the manifest: until then, other tenants do not find it (never the reverse)
            self._update_state(name, lambda state: state.update(public=sorted({*state.get("public", []), version})))
        return self.get(name, version)

    def _publish(self, name: str, version: int, files: Path, manifest: dict) -> None:
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            self.store.upload(files / fname, f"{name}/{version}/{fname}")
        self.store.put(f"{name}/{version}/{MANIFEST_FILE}", json.dumps(manifest, indent=2, sort_keys=True).encode(),
                       create=True)
        with self._lock:
            self._manifests[(name, version)] = manifest
            self._snapshot[name] = sorted({*self._snapshot.get(name, []), version})
            self._writes[(name, version)] = (time.monotonic(), manifest)

    def adopt(self, version: Version, files: Path) -> None:
        """Stores a copy of another registry's version under the same number (`registry copy`)."""
        try:
            self.store.put(f"{version.name}/{CLAIMS}/{version.version}", b"", create=True)
        except Precondition:
            raise Conflict(f"{version.key} already exists in {self.root}") from None
        self._publish(version.name, version.version, files, version.manifest)

    def set_state(self, name: str, state: dict) -> None:
        """Replaces the owner and aliases of `name` with a copied registry's (`registry copy`)."""
        self._update_state(name, lambda current: current.update(state))

    def state(self, name: str) -> dict:
        return self._read_state(check_name(name))[0]

    def _alias_state(self, name: str) -> dict:
        return self._states.get(name, {})

    def _present(self, name: str) -> set[int]:
        return set(self._stored_versions(name))

    def delete_version(self, name: str, version: int) -> None:
        """Hides the version at once (its manifest goes first), then removes its files; its number stays claimed."""
        if version not in self._stored_versions(check_name(name)):
            raise NotFound(f"adapter {name}@{check_version(version)} not found")
        self.store.delete(f"{name}/{version}/{MANIFEST_FILE}")
        with self._lock:
            self._snapshot[name] = [v for v in self._snapshot.get(name, []) if v != version]
            self._manifests.pop((name, version), None)
            self._writes[(name, version)] = (time.monotonic(), None)
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            self.store.delete(f"{name}/{version}/{fname}")

    def delete(self, name: str) -> list[int]:
        """Hides every version and frees the name; returns the versions deleted."""
        versions = self._stored_versions(check_name(name))
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        for version in versions:
            self.delete_version(name, version)

        def change(state: dict) -> None:
            state.update(aliases={}, alias_history={})
            state.pop("tenant", None)

        self._update_state(name, change)
        return versions

    def check(self) -> tuple[list[str], list[str]]:
        """Verifies every version's manifest and file hashes against the stored objects; returns (problems, notes)."""
        problems, notes = [], []
        objects: dict[str, dict[str, dict[str, int]]] = {}
        for key, size in self.store.keys():
            name, _, rest = key.partition("/")
            number, _, fname = rest.partition("/")
            if not NAME_RE.fullmatch(name):
                notes.append(f"{key}: not under an adapter name, ignored")
            elif VERSION_RE.fullmatch(number):
                objects.setdefault(name, {}).setdefault(number, {})[fname] = size
        for name, versions in sorted(objects.items()):
            for number, sizes in sorted(versions.items(), key=lambda item: int(item[0])):
                if MANIFEST_FILE not in sizes:
                    notes.append(f"{name}/{number}: files of an interrupted write or delete (invisible; safe to "
                                 "remove)")
                    continue
                problems += self._check_version(name, number, sizes)
        return problems, notes

    def _check_version(self, name: str, number: str, sizes: dict[str, int]) -> list[str]:
        where = f"{name}@{number}"
        got = self.store.get(f"{name}/{number}/{MANIFEST_FILE}")
        try:
            manifest = json.loads(got[0]) if got else None
        except ValueError as e:
            return [f"{where}: manifest unreadable: {e}"]
        if not isinstance(manifest, dict):
            return [f"{where}: manifest unreadable"]

        def digest(fname: str) -> str:
            body = self.store.get(f"{name}/{number}/{fname}")
            return hashlib.sha256(body[0]).hexdigest() if body else ""

        return manifest_problems(where, manifest, name, number, sizes, digest)
