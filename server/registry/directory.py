"""The adapter registry in a directory: versioned PEFT adapters with manifests and aliases, written atomically.

Layout: ROOT/NAME/VERSION/{adapter_config.json, adapter_model.safetensors, manifest.json} and
ROOT/NAME/state.json (aliases, next version). A version directory appears by one rename, complete.
"""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from server.core.atomic import fsync_dir, write_json
from server.core.base_model import BaseModelInfo
from server.core.digest import sha256_file
from server.registry.manifest import manifest_problems, stage
from server.registry.refs import (
    NAME_RE,
    STATE_FILE,
    VERSION_RE,
    Conflict,
    NotFound,
    Version,
    check_name,
    check_version,
    unavailable,
)
from server.registry.serving_state import Entry, ServingState
from server.registry.validation import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE


# A folder unchanged for this long is read again only when its time changes.
SETTLED_NS = 2_000_000_000
# Touched after every write through this class, from any process: while it has not moved since a reading that began
# after it settled, nothing changed, and a reading of the whole registry need not stat every adapter's folder (2,000
# stats were most of an idle gateway's CPU, BENCHMARKS.md).
CHANGES_FILE = ".changes"


class DirectoryRegistry(ServingState):
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._manifests: dict[tuple[str, int, int], dict] = {}
        self._read: dict[str, tuple[int, Entry]] = {}  # read_all's last reading of each adapter, by folder mtime
        self._clean_mark: int | None = None  # the change mark as of a reading that began after it settled

    def refresh(self) -> dict[str, list[int]]:
        """Every name's versions; a directory is read live, so there is no snapshot to renew."""
        if not self.root.is_dir():
            return {}
        listed = {p.name: self.versions(p.name) for p in self.root.iterdir() if NAME_RE.fullmatch(p.name)}
        return {name: versions for name, versions in listed.items() if versions}

    def read_all(self) -> dict[str, Entry]:
        """Every adapter with a version. Nothing is read while the change mark has not moved since a reading that
        began after it settled; otherwise an adapter is read again only if its folder changed (a version or the state
        is renamed into place, which changes it) or changed lately: a file's time is kept only to the clock's tick,
        so two changes in one tick look like one."""
        if not self.root.is_dir():
            return {}
        started, mark = time.time_ns(), self._mark()
        if mark is None or mark != self._clean_mark:
            self._scan()
            self._clean_mark = mark if mark is not None and started - mark > SETTLED_NS else None
        return {name: entry for name, (_, entry) in self._read.items() if entry.versions}

    def _scan(self) -> None:
        read = {}
        with os.scandir(self.root) as folders:
            for folder in folders:
                if NAME_RE.fullmatch(folder.name) and folder.is_dir():
                    stamp = folder.stat().st_mtime_ns
                    last = self._read.get(folder.name)
                    settled = time.time_ns() - stamp > SETTLED_NS
                    read[folder.name] = (stamp, last[1] if settled and last and last[0] == stamp else
                                         self.entry(folder.name))
        self._read = read

    def _mark(self) -> int | None:
        try:
            return (self.root / CHANGES_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _changed(self) -> None:
        """Moves the change mark; after the write, so that a reading that sees the mark moved sees the write."""
        (self.root / CHANGES_FILE).touch()

    def listing(self, name: str) -> tuple[list[int], dict]:
        """The adapter's versions and state as the directory holds them now."""
        return self.versions(name), self._state(check_name(name))

    def entry(self, name: str) -> Entry:
        """The adapter as the directory holds it now."""
        numbers, state = self.listing(name)
        versions = {}
        for number in numbers:
            try:
                versions[number] = self.get(name, number)
            except NotFound:  # deleted while listing
                continue
        return Entry(state, versions)

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
                self._changed()
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

    def register(self, name: str, source: Path, *, base: BaseModelInfo, max_rank: int, tenant: str = "default",
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
        self._changed()
        return version

    def _update_state(self, name: str, change: Callable[[dict], None]) -> dict:
        """Applies `change(state)` under the adapter's lock and writes the state atomically."""
        adapter_dir = self.root / check_name(name)
        with FileLock(adapter_dir / ".lock"):
            state = self._state(name)
            change(state)
            write_json(adapter_dir / STATE_FILE, state)
            self._changed()
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
        self._changed()
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
            self._changed()
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
