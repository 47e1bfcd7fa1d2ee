"""The data loop's store on S3-compatible object storage, beside an s3:// registry.

Layout under s3://BUCKET/PREFIX/ (T the tenant; every segment from a caller percent-quoted, see `_q`):
  T/records/ID                     the record (JSON); one GET by (tenant, id)
  T/index/model/MODEL/ID           empty markers of the filtered lists: a filter lists its folder instead of every
  T/index/key/KEY_ID/ID            record; a reader checks each record against the query, so a marker left behind
  T/index/meta/KEY/VALUE/ID        (a write or delete cut short) is skipped, never answered
  T/index/user/USER/ID             (for erase by user)
  T/feedback/ID/KEY_ID             one key's feedback on one answer (JSON)
  T/ledger/ID                      the ledger entry (JSON)
  T/erased/ID                      an erased record's id (empty)
  T/snapshots/SNAPSHOT_ID          an export's snapshot (JSON)

Ids are the gateway's, time-ordered: "chatcmpl-" or "cmpl-", 11 hex digits of milliseconds since the epoch (the
id's stamp, never after the record's `created`), random hex. So under any folder above, the keys of one route share
a prefix and S3's listing order is time order: a page lists its filter's folder from `after` (several filters: the
ids in all their folders, found by skipping ahead in each), and expiry stops at the first key stamped at or after the
cut-off. S3 lists in ascending order only, so a page in "desc" order lists up to `after`."""

import heapq
import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from itertools import islice, takewhile
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import boto3
from botocore.config import Config

from server.data.records import CompletionRecord, Feedback, LedgerEntry, ListQuery, Route, Snapshot
from server.store.bucket import Bucket

ID_PREFIX: dict[Route, str] = {"chat.completions": "chatcmpl-", "completions": "cmpl-"}
ID_RE = re.compile(r"(?:chatcmpl|cmpl)-([0-9a-f]{11})[0-9A-Za-z]*")
# Concurrent requests of one store: the writes of a batch, the reads of a page.
WORKERS = 16
# Keys per DeleteObjects request, and per listing request: S3's maximum.
DELETE_BATCH = LIST_PAGE = 1000
T = TypeVar("T")
R = TypeVar("R")


def _q(segment: str) -> str:
    """A caller's string as one key segment: no '/', never '.', '..' or empty, so it cannot leave its folder."""
    return quote(segment, safe="").replace(".", "%2E") or "%"


def _stamp(record_id: str) -> float:
    """The time in a gateway-made id, in seconds; ValueError for an id the gateway did not make."""
    match = ID_RE.fullmatch(record_id)
    if match is None:
        raise ValueError(f"{record_id!r} is not a time-ordered completion id (chatcmpl-/cmpl- and 11 hex digits)")
    return int(match[1], 16) / 1000


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _record_key(tenant: str, record_id: str) -> str:
    return f"{_q(tenant)}/records/{_q(record_id)}"


def _index(tenant: str, kind: str, *values: str) -> str:
    """The folder of one index's markers, e.g. T/index/model/MODEL/."""
    return "/".join([_q(tenant), "index", kind, *map(_q, values)]) + "/"


def _markers(record: CompletionRecord) -> set[str]:
    folders = [_index(record.tenant, "model", record.model)]
    folders += [_index(record.tenant, kind, value) for kind, value in (("key", record.key_id), ("user", record.user))
                if value is not None]
    folders += [_index(record.tenant, "meta", key, value) for key, value in record.metadata.items()]
    return {folder + _q(record.id) for folder in folders}


def _feedback_folder(tenant: str, record_id: str) -> str:
    return f"{_q(tenant)}/feedback/{_q(record_id)}/"


def _matches(record: CompletionRecord, query: ListQuery) -> bool:
    return (record.route == query.route and query.key_id in (None, record.key_id)
            and query.model in (None, record.model)
            and all(record.metadata.get(k) == v for k, v in query.metadata.items()))


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


class _Cursor:
    """One route's ids in one folder, ascending, read a page at a time; a seek far ahead lists from there."""

    def __init__(self, list_after: Callable[[str, str, int], tuple[list[str], bool]], folder: str, route: Route,
                 page: int):
        self.list_after, self.folder, self.page = list_after, folder, page
        self.under = folder + ID_PREFIX[route]
        self.buffer: deque[str] = deque()
        self.last = False  # the buffer holds the folder's last id

    def seek(self, target: str, strict: bool) -> str | None:
        """The first id past `target` (`strict`) or at it or past it; targets never go back."""
        while True:
            while self.buffer and (self.buffer[0] < target or strict and self.buffer[0] == target):
                self.buffer.popleft()
            if self.buffer or self.last:
                return self.buffer[0] if self.buffer else None
            # A key just before the target's: one id's key less its last character sorts below it.
            start = self.folder + (_q(target) if strict else _q(target)[:-1])
            keys, self.last = self.list_after(self.under, start, self.page)
            self.buffer = deque(unquote(key[len(self.folder):]) for key in keys)


def _joined(cursors: list[_Cursor], after: str | None) -> Iterator[str]:
    """The ids every cursor has, ascending, past `after`: each cursor seeks the largest id another has (leapfrog),
    so a rare filter's few ids skip a common one's many."""
    target, strict, agreed = after or "", after is not None, 0
    while True:
        for cursor in cursors:
            found = cursor.seek(target, strict)
            if found is None:
                return
            if found == target and not strict:
                agreed += 1
            else:
                target, strict, agreed = found, False, 1
            if agreed == len(cursors):
                yield target
                strict, agreed = True, 0


class S3Store:
    """`CompletionStore` on one bucket and prefix; a batch's objects are written, and a page's read, concurrently."""

    def __init__(self, url: str, client: Any = None):
        config = Config(retries={"mode": "standard"}, max_pool_connections=WORKERS)
        self.store = Bucket(url, client or boto3.client("s3", config=config))
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="completions-s3")

    def _each(self, work: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return list(self._pool.map(work, items))

    def _put_all(self, objects: Iterable[tuple[str, bytes]]) -> None:
        self._each(lambda item: self.store.put(*item), objects)

    def _delete_all(self, keys: Iterable[str]) -> None:
        for batch in _batched(keys, DELETE_BATCH):
            answer = self.store.s3.delete_objects(Bucket=self.store.bucket, Delete={
                "Objects": [{"Key": self.store.prefix + key} for key in batch], "Quiet": True})
            if answer.get("Errors"):
                raise RuntimeError(f"deleting {len(batch)} objects failed: {answer['Errors'][:3]}")

    def _ids(self, folder: str, route: Route) -> Iterator[str]:
        """Ids of one route's objects or markers in `folder`, in order."""
        return (unquote(key[len(folder):]) for key, _ in self.store.keys(folder + ID_PREFIX[route]))

    def _list_after(self, under: str, start_after: str, count: int) -> tuple[list[str], bool]:
        """Up to `count` keys under `under` past `start_after`, and whether that was the last of them."""
        answer = self.store.s3.list_objects_v2(Bucket=self.store.bucket, Prefix=self.store.prefix + under,
                                               StartAfter=self.store.prefix + start_after, MaxKeys=count)
        keys = [obj["Key"][len(self.store.prefix):] for obj in answer.get("Contents", [])]
        return keys, not answer.get("IsTruncated")

    def _get_json(self, key: str) -> dict | None:
        got = self.store.get(key)
        return json.loads(got[0]) if got else None

    def add(self, records: Sequence[CompletionRecord], ledger: Sequence[LedgerEntry]) -> None:
        """Markers first, then records and ledger entries: a batch cut short leaves markers the reads skip, never a
        record its filtered lists miss. ValueError, before anything is written, for an id not of its route."""
        for record in records:
            if not record.id.startswith(ID_PREFIX[record.route]):
                raise ValueError(f"{record.id!r} is no id of route {record.route}")
        for entry in [*records, *ledger]:
            _stamp(entry.id)
        self._put_all((key, b"") for record in records for key in _markers(record))
        self._put_all([*((_record_key(r.tenant, r.id), _json(asdict(r))) for r in records),
                       *((f"{_q(e.tenant)}/ledger/{_q(e.id)}", _json(asdict(e))) for e in ledger)])

    def get(self, tenant: str, record_id: str) -> CompletionRecord | None:
        data = self._get_json(_record_key(tenant, record_id))
        return CompletionRecord(**data) if data else None

    def _get_all(self, tenant: str, record_ids: Iterable[str]) -> list[CompletionRecord]:
        """The records of these ids that exist, in the ids' order."""
        return [r for r in self._each(lambda record_id: self.get(tenant, record_id), record_ids) if r is not None]

    def page(self, tenant: str, query: ListQuery) -> tuple[list[CompletionRecord], bool]:
        """One page in id (so time) order, and whether more follow: the ids in every filter's folder (in the
        records' when there is no filter), each record then read and checked. Like OpenAI's list, `after` must name
        a record of the tenant and route: the page starts just past it; an id that is not one (never was, deleted
        since, another tenant's) gives an empty page with no more to follow."""
        if query.after is not None and (not query.after.startswith(ID_PREFIX[query.route])
                                        or self.store.etag(_record_key(tenant, query.after)) is None):
            return [], False
        found: list[CompletionRecord] = []
        for ids in _batched(self._candidates(tenant, query), query.limit + 1):
            found += [r for r in self._get_all(tenant, ids) if _matches(r, query)]
            if len(found) > query.limit:
                break
        return found[:query.limit], len(found) > query.limit

    def _candidates(self, tenant: str, query: ListQuery) -> Iterator[str]:
        """The ids in every folder of the query's filters, in the query's order past `after`. S3 lists in ascending
        order only, so "desc" lists up to `after`."""
        folders = [_index(tenant, "meta", key, value) for key, value in query.metadata.items()]
        folders += [_index(tenant, kind, value) for kind, value in (("key", query.key_id), ("model", query.model))
                    if value is not None]
        page = min(query.limit + 1, LIST_PAGE) if query.order == "asc" else LIST_PAGE
        cursors = [_Cursor(self._list_after, folder, query.route, page)
                   for folder in folders or [f"{_q(tenant)}/records/"]]
        if query.order == "asc":
            return _joined(cursors, query.after)
        return reversed(list(takewhile(lambda i: query.after is None or i < query.after, _joined(cursors, None))))

    def set_metadata(self, tenant: str, record_id: str, metadata: dict[str, str]) -> CompletionRecord | None:
        """Replaces the record's metadata (new markers, the record, then stale markers); None if there is no such
        record."""
        record = self.get(tenant, record_id)
        if record is None:
            return None
        changed = replace(record, metadata=dict(metadata))
        old, new = _markers(record), _markers(changed)
        self._put_all((key, b"") for key in new - old)
        self.store.put(_record_key(tenant, record_id), _json(asdict(changed)))
        self._delete_all(old - new)
        return changed

    def delete(self, tenant: str, record_id: str) -> bool:
        """Deletes a record and the feedback on it; False if there was none."""
        return bool(self._remove(self._get_all(tenant, [record_id])))

    def _remove(self, records: Sequence[CompletionRecord]) -> list[CompletionRecord]:
        """Deletes the records' markers and feedback, then the records (last: a removal cut short can be redone)."""
        feedback = self._each(lambda r: [key for key, _ in self.store.keys(_feedback_folder(r.tenant, r.id))], records)
        self._delete_all([*(key for r in records for key in _markers(r)), *(key for keys in feedback for key in keys)])
        self._delete_all(_record_key(r.tenant, r.id) for r in records)
        return list(records)

    def ledger(self, tenant: str, record_id: str) -> LedgerEntry | None:
        data = self._get_json(f"{_q(tenant)}/ledger/{_q(record_id)}")
        return LedgerEntry(**data) if data else None

    def put_feedback(self, feedback: Feedback) -> None:
        """Stores feedback, replacing the same key's on the same answer."""
        self.store.put(_feedback_folder(feedback.tenant, feedback.id) + _q(feedback.key_id), _json(asdict(feedback)))

    def delete_feedback(self, tenant: str, record_id: str, key_id: str | None) -> int:
        """Retracts the key's feedback on an answer (every key's when key_id is None); how many were removed."""
        folder = _feedback_folder(tenant, record_id)
        keys = [key for key, _ in self.store.keys(folder)] if key_id is None else \
            [key for key in [folder + _q(key_id)] if self.store.etag(key) is not None]
        self._delete_all(keys)
        return len(keys)

    def feedback(self, tenant: str, *, record_ids: Sequence[str] | None = None,
                 since: float | None = None) -> list[Feedback]:
        """Feedback of a tenant, on the given answers or since a time (both: on them and since), in the order it
        was given."""
        folder = f"{_q(tenant)}/feedback/"
        wanted = None if record_ids is None else {_q(record_id) for record_id in record_ids}
        keys = [key for key, _ in self.store.keys(folder)
                if wanted is None or key[len(folder):].partition("/")[0] in wanted]
        found = [Feedback(**data) for data in self._each(self._get_json, keys) if data]
        return sorted((f for f in found if since is None or f.created >= since),
                      key=lambda f: (f.created, f.id, f.key_id))

    def erase(self, tenant: str, *, user: str | None = None,
              metadata: tuple[str, str] | None = None) -> list[str]:
        """Deletes every record of the tenant with that `user` (or metadata pair; both: with both) and the feedback
        on them; returns their ids, which are remembered (ids only, before anything is deleted) for lineage."""
        if user is None and metadata is None:
            raise ValueError("erase needs a user or a metadata pair")
        folder = _index(tenant, "user", user) if user is not None else _index(tenant, "meta", *metadata)
        erased: list[tuple[float, str]] = []
        for ids in _batched([unquote(key[len(folder):]) for key, _ in self.store.keys(folder)], DELETE_BATCH):
            records = [r for r in self._get_all(tenant, ids) if user in (None, r.user)
                       and (metadata is None or r.metadata.get(metadata[0]) == metadata[1])]
            self._put_all((f"{_q(tenant)}/erased/{_q(r.id)}", b"") for r in records)
            erased += [(r.created, r.id) for r in self._remove(records)]
        return [record_id for _, record_id in sorted(erased)]

    def erased(self, tenant: str, record_ids: Sequence[str]) -> int:
        """How many of these ids were erased."""
        folder = f"{_q(tenant)}/erased/"
        return len({unquote(key[len(folder):]) for key, _ in self.store.keys(folder)} & set(record_ids))

    def _stamped_before(self, folder: str, before: float) -> list[str]:
        """Ids in `folder` (both routes) stamped before `before`: the only ones that can be created before it."""
        return [i for route in ID_PREFIX for i in takewhile(lambda i: _stamp(i) < before, self._ids(folder, route))]

    def expire(self, tenant: str, before: float) -> int:
        """Deletes the tenant's records (and feedback on them) created before `before`; how many."""
        removed = 0
        for ids in _batched(self._stamped_before(f"{_q(tenant)}/records/", before), DELETE_BATCH):
            removed += len(self._remove([r for r in self._get_all(tenant, ids) if r.created < before]))
        return removed

    def expire_ledger(self, before: float) -> int:
        """Deletes ledger entries created before `before`, and the feedback on those of their answers that have no
        record; how many entries."""
        return sum(self._expire_ledger(tenant, before) for tenant in self._tenant_folders())

    def _expire_ledger(self, tenant: str, before: float) -> int:
        """expire_ledger in one (quoted) tenant folder."""
        folder = f"{tenant}/ledger/"
        keys = [folder + _q(i) for i in self._stamped_before(folder, before)]
        entries = [LedgerEntry(**e) for e in self._each(self._get_json, keys) if e and e["created"] < before]
        recorded = self._each(lambda e: self.store.etag(_record_key(e.tenant, e.id)) is not None, entries)
        self._delete_all([key for e, kept in zip(entries, recorded) if not kept
                          for key, _ in self.store.keys(_feedback_folder(e.tenant, e.id))])
        self._delete_all(folder + _q(e.id) for e in entries)
        return len(entries)

    def scan(self, tenant: str, *, version_prefix: str | None = None, since: float | None = None,
             route: str | None = None) -> Iterator[CompletionRecord]:
        """Every record of the tenant, oldest first, optionally of one adapter's versions (`name@`), created at or
        after `since`, of one route; reads every record of the routes scanned, a batch at a time."""
        folder = f"{_q(tenant)}/records/"
        routes = [route] if route is not None else list(ID_PREFIX)
        streams = [(r for ids in _batched(self._ids(folder, each), WORKERS * 4) for r in self._get_all(tenant, ids))
                   for each in routes]
        for record in heapq.merge(*streams, key=lambda r: (r.created, r.id)):
            if (since is None or record.created >= since) and (
                    version_prefix is None or (record.version or "").startswith(version_prefix)):
                yield record

    def _tenant_folders(self) -> list[str]:
        """The quoted tenant folders at the top of the prefix."""
        pages = self.store.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.store.bucket, Prefix=self.store.prefix, Delimiter="/")
        return [common["Prefix"][len(self.store.prefix):].rstrip("/")
                for page in pages for common in page.get("CommonPrefixes", [])]

    def _any(self, under: str) -> bool:
        answer = self.store.s3.list_objects_v2(Bucket=self.store.bucket, Prefix=self.store.prefix + under, MaxKeys=1)
        return answer.get("KeyCount", 0) > 0

    def tenants(self) -> list[str]:
        """Tenants with records or ledger entries."""
        return sorted(unquote(t) for t in self._tenant_folders()
                      if self._any(f"{t}/records/") or self._any(f"{t}/ledger/"))

    def save_snapshot(self, snapshot: Snapshot) -> None:
        self.store.put(f"{_q(snapshot.tenant)}/snapshots/{_q(snapshot.id)}", _json(asdict(snapshot)))

    def snapshot(self, tenant: str, snapshot_id: str) -> Snapshot | None:
        data = self._get_json(f"{_q(tenant)}/snapshots/{_q(snapshot_id)}")
        return Snapshot(**{**data, "record_ids": tuple(data["record_ids"])}) if data else None
