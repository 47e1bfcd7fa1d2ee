"""The gateway's parts, built once per app, and the domain steps that span them."""

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .admission import Admission
from .audit import AuditLog
from .auth import KeyStore
from .basemodel import BaseModel
from .config import Settings
from .metrics import Metrics
from .registry import Registry
from .routing import Router


@dataclass
class Gateway:
    """Everything a request handler needs."""

    settings: Settings
    registry: Registry
    base: BaseModel
    session: aiohttp.ClientSession  # shared by every engine client
    router: Router
    keys: KeyStore
    audit: AuditLog
    metrics: Metrics
    admission: Admission
    admin_token: str
    metrics_token: str | None
    archive_slots: asyncio.Semaphore  # LORAPLEX_ARCHIVE_WORKERS uploads unpacked at once
    started: float = field(default_factory=time.time)
    _cleanups: set = field(default_factory=set)

    def retire(self, deleted: list[tuple[str, Path]]) -> None:
        """Unloads deleted versions from every engine once their requests finish, then removes their files."""
        async def cleanup() -> None:
            for key, trash in deleted:
                for backend in self.router.backends:
                    await backend.residency.retire(key)
                await asyncio.to_thread(shutil.rmtree, trash, True)

        task = asyncio.create_task(cleanup())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
