"""The audit log: one JSON line per admin action or refusal, appended to STATE_DIR/audit.log."""

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class AuditLog:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "audit.log"
        # One writer thread of its own: an fsync per line must neither block the event loop nor take the default
        # pool's threads when refusals arrive in a flood.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")

    def record(self, actor: str, action: str, adapter: str | None = None, version: int | None = None,
               sha256: str | None = None, result: str = "ok", **detail) -> None:
        entry = {"time": time.time(), "actor": actor, "action": action, "adapter": adapter, "version": version,
                 "sha256": sha256, "result": result[:1000], **detail}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write() of one line on an O_APPEND descriptor: concurrent writers never interleave within a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    async def arecord(self, actor: str, action: str, adapter: str | None = None, version: int | None = None,
                      sha256: str | None = None, result: str = "ok", **detail) -> None:
        """`record`, from the event loop."""
        await asyncio.get_running_loop().run_in_executor(
            self._writer, lambda: self.record(actor, action, adapter, version, sha256, result, **detail))
