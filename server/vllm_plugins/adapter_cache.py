"""An engine's local copies of registry versions: content-addressed files, verified against the manifest.

An entry is ROOT/DIGEST/ (DIGEST from the manifest's file hashes, so versions with equal files share it). It appears
by one rename of a complete, verified download, and its files are hashed again each time it is handed out, so a
partial or damaged entry is never served: it is fetched again. The cache only stores: what may be deleted, and when,
is decided by its one owner (`server/vllm_plugins/residency.py`), which never runs two file operations on one entry at once.
"""

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple, Protocol

from server.core.digest import sha256_file
from server.registry import Version
from server.registry.validation import CONFIG_FILE, WEIGHTS_FILE

# Under vLLM's logger: the cache runs in the engine, whose handlers are vLLM's.
log = logging.getLogger("vllm.loraplex.adapter_cache")
FILES = (CONFIG_FILE, WEIGHTS_FILE)


class Source(Protocol):
    def fetch(self, version: Version, dest: Path) -> None: ...


class CorruptAdapter(Exception):
    """A download did not match the manifest's hashes."""


class Stored(NamedTuple):
    entry: Path
    used_ns: int
    size: int


def digest(manifest: dict) -> str:
    files = manifest["files"]
    return hashlib.sha256("".join(f"{f}:{files[f]['sha256']};" for f in FILES).encode()).hexdigest()[:32]


def matches(entry: Path, manifest: dict) -> bool:
    """Whether every file of `entry` has the size and sha256 the manifest gives."""
    for fname in FILES:
        meta, path = manifest["files"][fname], entry / fname
        if not path.is_file() or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            return False
    return True


class AdapterCache:
    """Verified local directories of registry versions, one per distinct set of files."""

    def __init__(self, root: Path, max_bytes: int, max_entries: int):
        self.root, self.max_bytes, self.max_entries = Path(root), max_bytes, max_entries
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".partial-*"):  # downloads cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)

    def entry(self, version: Version) -> Path:
        return self.root / digest(version.manifest)

    def ensure(self, version: Version, source: Source) -> bool:
        """Makes `entry(version)` a verified copy, downloading it from `source` unless a good copy is there already;
        returns whether it downloaded."""
        entry = self.entry(version)
        if entry.is_dir():
            if matches(entry, version.manifest):
                os.utime(entry)  # most recently used
                return False
            log.warning("cached %s at %s does not match its manifest: fetching it again", version.key, entry)
            self.remove(entry)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.root))
        try:
            source.fetch(version, partial)
            if not matches(partial, version.manifest):
                raise CorruptAdapter(f"{version.key}: downloaded files do not match the manifest's sha256")
            partial.chmod(0o755)
            try:
                os.rename(partial, entry)
            except OSError:  # a good copy landed meanwhile: it serves as well as this one
                if not matches(entry, version.manifest):
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return True

    def remove(self, entry: Path) -> None:
        """Out of sight by one rename first, so no reader sees a half-removed entry."""
        if not entry.is_dir():
            return
        aside = self.root / f".partial-{entry.name}-{os.urandom(4).hex()}"
        os.rename(entry, aside)
        shutil.rmtree(aside, ignore_errors=True)

    def stored(self) -> list[Stored]:
        """Every entry, least recently used first."""
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                found.append(Stored(entry, entry.stat().st_mtime_ns, size))
            except FileNotFoundError:
                continue  # removed while listed
        return sorted(found, key=lambda s: s.used_ns)

    def excess(self, stored: list[Stored], keep: set[Path]) -> list[Path]:
        """The least recently used entries outside `keep` whose removal brings the cache within its bounds."""
        total, count = sum(s.size for s in stored), len(stored)
        over = []
        for s in stored:
            if total <= self.max_bytes and count <= self.max_entries:
                break
            if s.entry in keep:
                continue
            over.append(s.entry)
            total, count = total - s.size, count - 1
        return over
