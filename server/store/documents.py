"""JSON documents that several processes change safely, kept beside the registry: a file under a lock for a directory
registry (in STATE_DIR), an object written with If-Match in the store for an object-store registry, so that every
gateway replica sees the same document."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from filelock import FileLock

from server.core.atomic import write_json
from server.store.location import is_object_store

SHARED = "_loraplex"  # the store's folder for state beside the registry; "_" starts no adapter name


class Document(Protocol):
    def tag(self) -> object:
        """What changes whenever the document does; None while it does not exist."""

    def read(self) -> dict | None: ...

    def update(self, change: Callable[[dict], None]) -> None:
        """Applies `change` to the current content (an empty dict if none) and writes it, without losing a
        concurrent writer's change."""


class FileDocument:
    def __init__(self, path: Path, mode: int = 0o600):
        self.path, self.mode = Path(path), mode

    def tag(self) -> object:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def update(self, change: Callable[[dict], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self.read() or {}
            change(data)
            write_json(self.path, data, mode=self.mode)


class StoreDocument:
    """An object in the registry's bucket; `update` retries while another writer wins the If-Match race."""

    def __init__(self, registry_url: str, name: str):
        from server.store.bucket import Bucket  # imports boto3, which a directory registry's commands never need

        self.store, self.key = Bucket(registry_url), f"{SHARED}/{name}"

    def tag(self) -> object:
        return self.store.etag(self.key)

    def read(self) -> dict | None:
        got = self.store.get(self.key)
        return json.loads(got[0]) if got else None

    def update(self, change: Callable[[dict], None]) -> None:
        if self.store.update_json(self.key, change, pause=0.01) is None:
            raise RuntimeError(f"{self.key} kept changing under this write; try again")


def shared_document(registry: str, state_dir: Path, name: str) -> Document:
    """The document `name` for this registry: in its store if it is one, else in STATE_DIR."""
    if is_object_store(registry):
        return StoreDocument(registry, name)
    return FileDocument(Path(state_dir) / name)
