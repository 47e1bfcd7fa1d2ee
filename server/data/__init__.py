"""The data loop's storage: stored completions, the ledger, feedback and export snapshots, beside the registry
(SQLite in STATE_DIR for a directory registry, the object store for s3://)."""

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from server.data.records import CompletionRecord, Feedback, LedgerEntry, ListQuery, Snapshot
from server.store.documents import SHARED
from server.store.location import is_object_store

__all__ = ["CompletionRecord", "CompletionStore", "Feedback", "LedgerEntry", "ListQuery", "Snapshot", "open_store"]


class CompletionStore(Protocol):
    """Every method is blocking (the gateway calls it from a thread); every read is scoped to one tenant, so another
    tenant's id reads exactly as a missing one."""

    def add(self, records: Sequence[CompletionRecord], ledger: Sequence[LedgerEntry]) -> None:
        """One batch: the captured records, and the ledger entries of every answer (captured or not)."""

    def get(self, tenant: str, record_id: str) -> CompletionRecord | None: ...

    def page(self, tenant: str, query: ListQuery) -> tuple[list[CompletionRecord], bool]:
        """One page in (created, id) order, and whether more follow."""

    def set_metadata(self, tenant: str, record_id: str, metadata: dict[str, str]) -> CompletionRecord | None:
        """Replaces the record's metadata; None if there is no such record."""

    def delete(self, tenant: str, record_id: str) -> bool:
        """Deletes a record and the feedback on it; False if there was none."""

    def ledger(self, tenant: str, record_id: str) -> LedgerEntry | None: ...

    def put_feedback(self, feedback: Feedback) -> None:
        """Stores feedback, replacing the same key's on the same answer."""

    def delete_feedback(self, tenant: str, record_id: str, key_id: str | None) -> int:
        """Retracts the key's feedback on an answer (every key's when key_id is None); how many were removed."""

    def feedback(self, tenant: str, *, record_ids: Sequence[str] | None = None,
                 since: float | None = None) -> list[Feedback]:
        """Feedback of a tenant, on the given answers or since a time."""

    def erase(self, tenant: str, *, user: str | None = None,
              metadata: tuple[str, str] | None = None) -> list[str]:
        """Deletes every record of the tenant with that `user` (or metadata pair) and the feedback on them; returns
        their ids, which are remembered (ids only) for lineage."""

    def erased(self, tenant: str, record_ids: Sequence[str]) -> int:
        """How many of these ids were erased."""

    def expire(self, tenant: str, before: float) -> int:
        """Deletes the tenant's records (and feedback on them) created before `before`; how many."""

    def expire_ledger(self, before: float) -> int:
        """Deletes ledger entries (and feedback whose answer has no record) created before `before`."""

    def scan(self, tenant: str, *, version_prefix: str | None = None, since: float | None = None,
             route: str | None = None) -> Iterator[CompletionRecord]:
        """Every record of the tenant, oldest first, optionally of one adapter's versions (`name@`)."""

    def tenants(self) -> list[str]:
        """Tenants with records or ledger entries."""

    def save_snapshot(self, snapshot: Snapshot) -> None: ...

    def snapshot(self, tenant: str, snapshot_id: str) -> Snapshot | None: ...


def open_store(registry: str | Path, state_dir: Path) -> CompletionStore:
    """SQLite in STATE_DIR beside a directory registry; the object store beside an s3:// one."""
    if is_object_store(registry):
        from server.data.s3_store import S3Store

        return S3Store(f"{str(registry).rstrip('/')}/{SHARED}/completions")
    from server.data.sqlite_store import SqliteStore

    return SqliteStore(Path(state_dir) / "completions.sqlite3")
