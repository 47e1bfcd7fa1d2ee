"""The audit log: one JSON line per change or refusal. In STATE_DIR/audit.log beside a directory registry, renamed
aside (audit.log.NANOSECONDS) once past ROTATE_BYTES; beside an object-store registry, one stream of objects per
gateway (or CLI) process. Either way every part is read back, merged by time."""

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock

from server.observability.request_ids import REQUEST_ID
from server.store.documents import SHARED
from server.store.location import is_object_store
from server.store.streams import stream_id

AUDIT_PREFIX = f"{SHARED}/audit/"
ROTATE_BYTES = 16 * 2**20
class AuditLog:
    def __init__(self, state_dir: Path, registry: str = "", rotate_bytes: int = ROTATE_BYTES):
        self.path = Path(state_dir) / "audit.log"
        self.rotate_bytes = rotate_bytes
        self.store = None
        if is_object_store(registry):
            from server.store.bucket import Bucket  # imports boto3, which a directory registry never needs

            self.store = Bucket(registry)
        # Each process its own stream: writers never contend, and no object is ever rewritten.
        self.stream = f"{AUDIT_PREFIX}{stream_id()}/"
        # One writer thread of its own: an fsync (or a put) per line must neither block the event loop nor take the
        # default pool's threads when refusals arrive in a flood.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._sequence = 0

    def record(self, actor: str, action: str, adapter: str | None = None, version: int | None = None,
               sha256: str | None = None, result: str = "ok", **detail) -> None:
        entry = {"time": time.time(), "actor": actor, "action": action, "adapter": adapter, "version": version,
                 "sha256": sha256, "result": result[:1000], **detail}
        line = json.dumps(entry, sort_keys=True) + "\n"
        if self.store is not None:
            self._sequence += 1
            self.store.put(f"{self.stream}{time.time_ns():020d}-{self._sequence:08d}.json", line.encode())
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write() of one line on an O_APPEND descriptor: concurrent writers never interleave within a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
            full = os.fstat(fd).st_size >= self.rotate_bytes
        finally:
            os.close(fd)
        if full:
            self._rotate()

    def _rotate(self) -> None:
        """Renames the full log aside. A writer that opened it before the rename still appends there, and the
        renamed file is read too, so no line is lost; the lock makes one process rotate, not each."""
        with FileLock(self.path.with_name("audit.log.lock")):
            try:
                if self.path.stat().st_size >= self.rotate_bytes:
                    os.rename(self.path, self.path.with_name(f"audit.log.{time.time_ns()}"))
            except FileNotFoundError:
                pass

    async def arecord(self, actor: str, action: str, adapter: str | None = None, version: int | None = None,
                      sha256: str | None = None, result: str = "ok", **detail) -> None:
        """`record`, from the event loop, with the id of the request being served."""
        request_id = REQUEST_ID.get()
        if request_id is not None:
            detail["request_id"] = request_id
        await asyncio.get_running_loop().run_in_executor(
            self._writer, lambda: self.record(actor, action, adapter, version, sha256, result, **detail))

    def entries(self) -> list[dict]:
        """Every entry of every stream, oldest first."""
        if self.store is None:
            entries = []
            for part in [*sorted(self.path.parent.glob("audit.log.[0-9]*")), self.path]:
                try:
                    entries += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
                except FileNotFoundError:
                    continue
            return sorted(entries, key=lambda e: e["time"])
        entries = []
        for key, _ in self.store.keys(AUDIT_PREFIX):
            got = self.store.get(key)
            if got is not None:
                entries.append(json.loads(got[0]))
        return sorted(entries, key=lambda e: e["time"])
