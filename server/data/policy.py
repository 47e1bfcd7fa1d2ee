"""Per-tenant data policies: whether completions are stored (off, opt-in, on), for how long, and what is redacted
before anything is written. One shared document beside the registry, read by every gateway replica."""

import asyncio
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.core.durations import duration, positive_duration
from server.core.periodic import every
from server.data.redaction import PATTERNS
from server.store.documents import Document

POLICIES_FILE = "data_policies.json"
# Tenant of requests on a gateway without keys.
OPEN_TENANT = "default"
log = logging.getLogger("loraplex.data")


class DataPolicy(BaseModel):
    """capture: off (default), opt-in (only `"store": true`) or on (all but `"store": false`)."""

    model_config = ConfigDict(extra="forbid")

    capture: Literal["off", "opt-in", "on"] = "off"
    retention: str = Field("30d", description="How long stored completions are kept: 45s, 30m, 12h, 7d.")
    redact: list[Literal[tuple(PATTERNS)]] = Field(default_factory=list,  # type: ignore[valid-type]
                                                   description="Patterns replaced before anything is written.")

    @field_validator("retention")
    @classmethod
    def _duration(cls, value: str) -> str:
        return positive_duration(value)

    @property
    def retention_seconds(self) -> float:
        return duration(self.retention)

    def stores(self, store: bool | None) -> bool:
        """Whether a request with this `store` field is stored under the policy."""
        return self.capture == "on" and store is not False or self.capture == "opt-in" and store is True


class Policies:
    """The tenants' policies, read from the shared document and kept in memory; the request path reads memory only."""

    def __init__(self, document: Document):
        self.document = document
        self._policies: dict[str, DataPolicy] = {}
        self._tag: object = None
        self.refresh()

    def refresh(self) -> None:
        tag = self.document.tag()
        if tag == self._tag:
            return
        data = self.document.read() or {}
        self._policies = {tenant: DataPolicy(**policy) for tenant, policy in data.items()}
        self._tag = tag

    def of(self, tenant: str | None) -> DataPolicy:
        return self._policies.get(tenant or OPEN_TENANT) or DataPolicy()

    def all(self) -> dict[str, DataPolicy]:
        return dict(self._policies)

    def set(self, tenant: str, policy: DataPolicy) -> None:
        def change(data: dict) -> None:
            data[tenant] = policy.model_dump()

        self.document.update(change)
        self._tag = None
        self.refresh()

    async def keep_current(self, poll: float) -> None:
        """Reads the policies every `poll` seconds, so a change made elsewhere counts here."""
        await every(poll, lambda: asyncio.to_thread(self.refresh), "reading the data policies failed; using the last")
