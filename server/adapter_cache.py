"""An engine's local copies of registry versions: content-addressed, verified against the manifest, size-bounded.

An entry is ROOT/DIGEST/ (DIGEST from the manifest's file hashes, so versions with equal files share it). It appears
by one rename of a complete, verified download, and its files are hashed again each time it is handed out, so a
partial or damaged entry is never served: it is fetched again.
"""

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .registry import Version, sha256_file
from .validation import CONFIG_FILE, WEIGHTS_FILE

# Under vLLM's logger: the cache runs in the engine, whose handlers are vLLM's.
log = logging.getLogger("vllm.loraplex.adapter_cache")
FILES = (CONFIG_FILE, WEIGHTS_FILE)


class Source(Protocol):
    def fetch(self, version: Version, dest: Path) -> None: ...


class CorruptAdapter(Exception):
    """A download did not match the manifest's hashes."""


def digest(manifest: dict) -> str:
    files = manifest["files"]
    return hashlib.sha256("".join(f"{f}:{files[f]['sha256']};" for f in FILES).encode()).hexdigest()[:32]


def _matches(entry: Path, manifest: dict) -> bool:
    for fname in FILES:
        meta, path = manifest["files"][fname], entry / fname
        if not path.is_file() or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            return False
    return True


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file())


class AdapterCache:
    """Hands out a verified local directory for a registry version; keeps at most `max_entries` and `max_bytes`,
    evicting the least recently used entries that `in_use` says no engine request needs."""

    def __init__(self, root: Path, max_bytes: int, max_entries: int,
                 in_use: Callable[[Path], bool] = lambda path: False):
        self.root, self.max_bytes, self.max_entries, self.in_use = Path(root), max_bytes, max_entries, in_use
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for leftover in self.root.glob(".partial-*"):  # downloads cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)

    def path(self, version: Version, source: Source) -> tuple[Path, bool]:
        """The local directory of `version`, and whether it was downloaded from `source` (no good copy was here)."""
        entry = self.root / digest(version.manifest)
        with self._lock:
            if entry.is_dir():
                if _matches(entry, version.manifest):
                    os.utime(entry)  # most recently used
                    return entry, False
                log.warning("cached %s at %s does not match its manifest: fetching it again", version.key, entry)
                self._remove(entry)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.root))
        try:
            source.fetch(version, partial)
            if not _matches(partial, version.manifest):
                raise CorruptAdapter(f"{version.key}: downloaded files do not match the manifest's sha256")
            partial.chmod(0o755)
            with self._lock:
                if not entry.is_dir():
                    os.rename(partial, entry)
                os.utime(entry)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return entry, True

    def _remove(self, entry: Path) -> None:
        """Out of sight by one rename first, so no reader sees a half-removed entry."""
        aside = self.root / f".partial-{entry.name}-{os.urandom(4).hex()}"
        os.rename(entry, aside)
        shutil.rmtree(aside, ignore_errors=True)

    def trim(self, keep: Path | None = None) -> None:
        """Evicts least recently used entries, never `keep` or one in use, until the cache is within its bound."""
        with self._lock:
            self._trim(keep)

    def _trim(self, keep: Path | None) -> None:
        entries = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime_ns)
        total, count = sum(_size(p) for p in entries), len(entries)
        for entry in entries:
            if total <= self.max_bytes and count <= self.max_entries:
                return
            if entry == keep or self.in_use(entry):
                continue
            total, count = total - _size(entry), count - 1
            self._remove(entry)
        if total > self.max_bytes or count > self.max_entries:
            log.warning("adapter cache holds %d entries of %d bytes, over its bounds: the rest are in use", count,
                        total)
