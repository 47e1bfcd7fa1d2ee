"""What the data loop keeps: stored completions, the content-free ledger of every answer, feedback on answers, and
the snapshots exports make (for lineage)."""

import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

Route = Literal["chat.completions", "completions"]


@dataclass(frozen=True)
class LedgerEntry:
    """Every answer, captured or not: enough to trace feedback to tenant, key and version, nothing the caller wrote."""

    id: str  # the answer's id, as the caller saw it ("chatcmpl-…", "cmpl-…"); assigned by the gateway
    tenant: str
    key_id: str | None
    version: str | None  # "name@3" that answered; None for the base model
    created: float


@dataclass(frozen=True)
class CompletionRecord:
    """A stored completion: the request as received and the answer as delivered (a stream assembled), both redacted
    per the tenant's policy before they are written."""

    id: str
    tenant: str
    key_id: str | None
    route: Route
    model: str  # what the caller named: an adapter reference ("a", "a@3", "a@stable") or the base model's name
    version: str | None  # "name@3" that answered
    created: float
    request: dict
    response: dict
    request_id: str
    user: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "first_token", "total"

    @property
    def ledger(self) -> LedgerEntry:
        return LedgerEntry(self.id, self.tenant, self.key_id, self.version, self.created)


@dataclass(frozen=True)
class Feedback:
    """One key's feedback on one answer; a later post by the same key replaces it."""

    id: str  # the answer's id
    tenant: str
    key_id: str  # the key that posted it ("operator:NAME" / "tenant-admin:KEYID" for admins)
    version: str | None  # the version that gave the answer, from the ledger
    rating: float  # in [-1, 1]: up is 1, down -1
    correction: str | None
    comment: str | None
    created: float


@dataclass(frozen=True)
class ListQuery:
    """OpenAI's list of stored chat completions, scoped: a tenant's records, or one key's of them."""

    key_id: str | None = None  # None: every record of the tenant (a tenant-admin)
    model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # every pair must match
    after: str | None = None  # the id the previous page ended with
    limit: int = 20
    order: Literal["asc", "desc"] = "asc"
    route: Route = "chat.completions"


@dataclass(frozen=True)
class Snapshot:
    """An export: which records went into a training set, so that a version trained on it can be traced."""

    id: str
    tenant: str
    adapter: str | None
    record_ids: tuple[str, ...]
    filters: dict
    created: float


def new_answer_id() -> str:
    """The id part of an answer's id: 11 hex digits of milliseconds since the epoch, so ids sort by time, then 80
    random bits, so no two are alike and none can be guessed. Never anything the caller sent."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(10)}"
