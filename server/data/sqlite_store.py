"""The data loop's store in one SQLite database (WAL), beside a directory registry.

Tables: records (the request, response, metadata, usage and timings as JSON text), metadata (one row per record and
pair, carrying the record's route and created so that a pair's index answers a filtered list in order), ledger,
feedback, erased (ids only) and snapshots. Every list is an index range in (created, id) order."""

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar, get_args

from server.data.records import CompletionRecord, Feedback, LedgerEntry, ListQuery, Route, Snapshot

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    tenant TEXT NOT NULL, id TEXT NOT NULL, key_id TEXT, route TEXT NOT NULL, model TEXT NOT NULL, version TEXT,
    created REAL NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL, request_id TEXT NOT NULL, user TEXT,
    metadata TEXT NOT NULL, usage TEXT NOT NULL, timings TEXT NOT NULL, PRIMARY KEY (tenant, id));
CREATE INDEX IF NOT EXISTS records_route ON records (tenant, route, created, id);
CREATE INDEX IF NOT EXISTS records_model ON records (tenant, route, model, created, id);
CREATE INDEX IF NOT EXISTS records_key ON records (tenant, route, key_id, created, id);
CREATE INDEX IF NOT EXISTS records_created ON records (tenant, created, id);
CREATE INDEX IF NOT EXISTS records_user ON records (tenant, user);
CREATE TABLE IF NOT EXISTS metadata (
    tenant TEXT NOT NULL, id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, route TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (tenant, id, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS metadata_pair ON metadata (tenant, route, key, value, created, id);
CREATE TABLE IF NOT EXISTS ledger (
    tenant TEXT NOT NULL, id TEXT NOT NULL, key_id TEXT, version TEXT, created REAL NOT NULL,
    PRIMARY KEY (tenant, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_created ON ledger (created);
CREATE TABLE IF NOT EXISTS feedback (
    tenant TEXT NOT NULL, id TEXT NOT NULL, key_id TEXT NOT NULL, version TEXT, rating REAL NOT NULL,
    correction TEXT, comment TEXT, created REAL NOT NULL, PRIMARY KEY (tenant, id, key_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS feedback_created ON feedback (tenant, created);
CREATE TABLE IF NOT EXISTS erased (tenant TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (tenant, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    tenant TEXT NOT NULL, id TEXT NOT NULL, adapter TEXT, record_ids TEXT NOT NULL, filters TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (tenant, id)) WITHOUT ROWID;
"""
RECORD_COLUMNS = ("tenant", "id", "key_id", "route", "model", "version", "created", "request", "response",
                  "request_id", "user", "metadata", "usage", "timings")
JSON_COLUMNS = {"request", "response", "metadata", "usage", "timings"}
SELECT_RECORD = ", ".join(f"r.{c}" for c in RECORD_COLUMNS)
FEEDBACK_COLUMNS = "id, tenant, key_id, version, rating, correction, comment, created"  # Feedback's order
ROUTES: tuple[Route, ...] = get_args(Route)
# Rows a scan reads at a time, and ids per IN (...): well under SQLite's limit on bound parameters.
CHUNK = 500
# How long a write waits for another connection's write to finish before it fails.
BUSY_SECONDS = 30.0
T = TypeVar("T")


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _record(row: Sequence) -> CompletionRecord:
    fields = {c: json.loads(v) if c in JSON_COLUMNS else v for c, v in zip(RECORD_COLUMNS, row)}
    return CompletionRecord(**fields)


def _record_row(record: CompletionRecord) -> tuple:
    fields = asdict(record)
    return tuple(_dumps(fields[c]) if c in JSON_COLUMNS else fields[c] for c in RECORD_COLUMNS)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


class SqliteStore:
    """`CompletionStore` in one SQLite file (mode 0600: it holds what users wrote), one connection per thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)  # SQLite gives its -wal and -shm files the database's mode
        self._local = threading.local()
        self._conn().executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut may lose the last batch
            self._local.conn = conn
        return conn

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `work(conn)` in one write transaction."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def add(self, records: Sequence[CompletionRecord], ledger: Sequence[LedgerEntry]) -> None:
        """One transaction for the batch; an id stored already is replaced (a batch written twice)."""
        placeholders = ", ".join("?" * len(RECORD_COLUMNS))
        pairs = [(r.tenant, r.id, k, v, r.route, r.created) for r in records for k, v in r.metadata.items()]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(f"INSERT OR REPLACE INTO records ({', '.join(RECORD_COLUMNS)}) VALUES ({placeholders})",
                             [_record_row(r) for r in records])
            conn.executemany("DELETE FROM metadata WHERE tenant = ? AND id = ?", [(r.tenant, r.id) for r in records])
            conn.executemany("INSERT INTO metadata VALUES (?, ?, ?, ?, ?, ?)", pairs)
            conn.executemany("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?, ?)",
                             [(e.tenant, e.id, e.key_id, e.version, e.created) for e in ledger])

        self._write(work)

    def get(self, tenant: str, record_id: str) -> CompletionRecord | None:
        row = self._conn().execute(f"SELECT {SELECT_RECORD} FROM records r WHERE r.tenant = ? AND r.id = ?",
                                   (tenant, record_id)).fetchone()
        return _record(row) if row else None

    def page(self, tenant: str, query: ListQuery) -> tuple[list[CompletionRecord], bool]:
        """One page in (created, id) order, and whether more follow. Like OpenAI's list, `after` must name a record
        of the tenant and route (matching the filters or not): the page starts just past it; an id that is not one
        (never was, deleted since, another tenant's) gives an empty page with no more to follow."""
        sql, args = self._page_sql(tenant, query)
        if sql is None:
            return [], False
        rows = self._conn().execute(sql, args).fetchall()
        return [_record(row) for row in rows[:query.limit]], len(rows) > query.limit

    def _page_sql(self, tenant: str, query: ListQuery) -> tuple[str | None, list]:
        """The page's query, driven by the first metadata pair's index when there is one; None: `after` is no
        record of the tenant."""
        pairs = list(query.metadata.items())
        source, order = ("metadata m CROSS JOIN records r ON r.tenant = m.tenant AND r.id = m.id", "m") if pairs \
            else ("records r", "r")
        where, args = [f"{order}.tenant = ?", f"{order}.route = ?"], [tenant, query.route]
        if pairs:
            where.append("m.key = ? AND m.value = ?")
            args.extend(pairs[0])
        for column in ("model", "key_id"):
            if getattr(query, column) is not None:
                where.append(f"r.{column} = ?")
                args.append(getattr(query, column))
        for key, value in pairs[1:]:
            where.append("EXISTS (SELECT 1 FROM metadata x WHERE x.tenant = r.tenant AND x.id = r.id"
                         " AND x.key = ? AND x.value = ?)")
            args.extend((key, value))
        direction, beyond = ("ASC", ">") if query.order == "asc" else ("DESC", "<")
        if query.after is not None:
            mark = self._conn().execute("SELECT created, id FROM records WHERE tenant = ? AND route = ? AND id = ?",
                                        (tenant, query.route, query.after)).fetchone()
            if mark is None:
                return None, []
            where.append(f"({order}.created, {order}.id) {beyond} (?, ?)")
            args.extend(mark)
        sql = (f"SELECT {SELECT_RECORD} FROM {source} WHERE {' AND '.join(where)}"
               f" ORDER BY {order}.created {direction}, {order}.id {direction} LIMIT ?")
        return sql, [*args, query.limit + 1]

    def set_metadata(self, tenant: str, record_id: str, metadata: dict[str, str]) -> CompletionRecord | None:
        """Replaces the record's metadata; None if there is no such record."""

        def work(conn: sqlite3.Connection) -> bool:
            changed = conn.execute("UPDATE records SET metadata = ? WHERE tenant = ? AND id = ?",
                                   (_dumps(metadata), tenant, record_id)).rowcount
            conn.execute("DELETE FROM metadata WHERE tenant = ? AND id = ?", (tenant, record_id))
            conn.executemany("INSERT INTO metadata SELECT tenant, id, ?, ?, route, created FROM records"
                             " WHERE tenant = ? AND id = ?", [(k, v, tenant, record_id) for k, v in metadata.items()])
            return bool(changed)

        return self.get(tenant, record_id) if self._write(work) else None

    def delete(self, tenant: str, record_id: str) -> bool:
        """Deletes a record and the feedback on it; False if there was none."""
        return bool(self._write(lambda conn: self._remove(conn, tenant, [record_id])))

    @staticmethod
    def _remove(conn: sqlite3.Connection, tenant: str, record_ids: Iterable[str]) -> int:
        """Deletes these records, their metadata rows and the feedback on them; how many records there were."""
        keys = [(tenant, record_id) for record_id in record_ids]
        conn.executemany("DELETE FROM metadata WHERE tenant = ? AND id = ?", keys)
        conn.executemany("DELETE FROM feedback WHERE tenant = ? AND id = ?", keys)
        return conn.executemany("DELETE FROM records WHERE tenant = ? AND id = ?", keys).rowcount

    def ledger(self, tenant: str, record_id: str) -> LedgerEntry | None:
        row = self._conn().execute("SELECT id, tenant, key_id, version, created FROM ledger"
                                   " WHERE tenant = ? AND id = ?", (tenant, record_id)).fetchone()
        return LedgerEntry(*row) if row else None

    def put_feedback(self, feedback: Feedback) -> None:
        """Stores feedback, replacing the same key's on the same answer."""
        f = feedback
        self._write(lambda conn: conn.execute(
            f"INSERT OR REPLACE INTO feedback ({FEEDBACK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (f.id, f.tenant, f.key_id, f.version, f.rating, f.correction, f.comment, f.created)))

    def delete_feedback(self, tenant: str, record_id: str, key_id: str | None) -> int:
        """Retracts the key's feedback on an answer (every key's when key_id is None); how many were removed."""
        sql, args = "DELETE FROM feedback WHERE tenant = ? AND id = ?", [tenant, record_id]
        if key_id is not None:
            sql, args = f"{sql} AND key_id = ?", [*args, key_id]
        return self._write(lambda conn: conn.execute(sql, args).rowcount)

    def feedback(self, tenant: str, *, record_ids: Sequence[str] | None = None,
                 since: float | None = None) -> list[Feedback]:
        """Feedback of a tenant, on the given answers or since a time (both: on them and since), in the order it
        was given."""
        where, args = "tenant = ?", [tenant]
        if since is not None:
            where, args = f"{where} AND created >= ?", [*args, since]
        batches = [[]] if record_ids is None else _chunks(list(dict.fromkeys(record_ids)))
        found = []
        for ids in batches:
            among = f" AND id IN ({', '.join('?' * len(ids))})" if record_ids is not None else ""
            rows = self._conn().execute(f"SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE {where}{among}",
                                        [*args, *ids]).fetchall()
            found.extend(Feedback(*row) for row in rows)
        return sorted(found, key=lambda f: (f.created, f.id, f.key_id))

    def erase(self, tenant: str, *, user: str | None = None,
              metadata: tuple[str, str] | None = None) -> list[str]:
        """Deletes every record of the tenant with that `user` (or metadata pair; both: with both) and the feedback
        on them; returns their ids, which are remembered (ids only) for lineage."""
        if user is None and metadata is None:
            raise ValueError("erase needs a user or a metadata pair")
        sql, args = "SELECT r.id FROM records r WHERE r.tenant = ?", [tenant]
        if user is not None:
            sql, args = f"{sql} AND r.user = ?", [*args, user]
        if metadata is not None:
            sql += (" AND r.id IN (SELECT m.id FROM metadata m WHERE m.tenant = ?"
                    f" AND m.route IN ({', '.join('?' * len(ROUTES))}) AND m.key = ? AND m.value = ?)")
            args.extend((tenant, *ROUTES, *metadata))

        def work(conn: sqlite3.Connection) -> list[str]:
            ids = [row[0] for row in conn.execute(f"{sql} ORDER BY r.created, r.id", args)]
            self._remove(conn, tenant, ids)
            conn.executemany("INSERT OR IGNORE INTO erased VALUES (?, ?)", [(tenant, i) for i in ids])
            return ids

        return self._write(work)

    def erased(self, tenant: str, record_ids: Sequence[str]) -> int:
        """How many of these ids were erased."""
        count = 0
        for ids in _chunks(list(set(record_ids))):
            count += self._conn().execute(
                f"SELECT COUNT(*) FROM erased WHERE tenant = ? AND id IN ({', '.join('?' * len(ids))})",
                [tenant, *ids]).fetchone()[0]
        return count

    def expire(self, tenant: str, before: float) -> int:
        """Deletes the tenant's records (and feedback on them) created before `before`; how many."""

        def work(conn: sqlite3.Connection) -> int:
            ids = [row[0] for row in conn.execute("SELECT id FROM records WHERE tenant = ? AND created < ?",
                                                  (tenant, before))]
            return self._remove(conn, tenant, ids)

        return self._write(work)

    def expire_ledger(self, before: float) -> int:
        """Deletes ledger entries created before `before`, and the feedback on those of their answers that have no
        record; how many entries."""

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM feedback WHERE (tenant, id) IN (SELECT l.tenant, l.id FROM ledger l"
                         " WHERE l.created < ? AND NOT EXISTS (SELECT 1 FROM records r"
                         " WHERE r.tenant = l.tenant AND r.id = l.id))", (before,))
            return conn.execute("DELETE FROM ledger WHERE created < ?", (before,)).rowcount

        return self._write(work)

    def scan(self, tenant: str, *, version_prefix: str | None = None, since: float | None = None,
             route: str | None = None) -> Iterator[CompletionRecord]:
        """Every record of the tenant, oldest first, optionally of one adapter's versions (`name@`), created at or
        after `since`, of one route; read a chunk at a time, so no read stays open between them."""
        where, args = ["r.tenant = ?"], [tenant]
        if version_prefix is not None:
            where.append("substr(r.version, 1, ?) = ?")
            args.extend((len(version_prefix), version_prefix))
        if since is not None:
            where.append("r.created >= ?")
            args.append(since)
        if route is not None:
            where.append("r.route = ?")
            args.append(route)
        mark: tuple = ()
        while True:
            beyond = ["(r.created, r.id) > (?, ?)"] if mark else []
            rows = self._conn().execute(
                f"SELECT {SELECT_RECORD} FROM records r WHERE {' AND '.join(where + beyond)}"
                " ORDER BY r.created, r.id LIMIT ?", [*args, *mark, CHUNK]).fetchall()
            yield from map(_record, rows)
            if len(rows) < CHUNK:
                return
            mark = (rows[-1][RECORD_COLUMNS.index("created")], rows[-1][RECORD_COLUMNS.index("id")])

    def tenants(self) -> list[str]:
        """Tenants with records or ledger entries."""
        rows = self._conn().execute("SELECT tenant FROM records UNION SELECT tenant FROM ledger ORDER BY tenant")
        return [row[0] for row in rows]

    def save_snapshot(self, snapshot: Snapshot) -> None:
        s = snapshot
        self._write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
            (s.tenant, s.id, s.adapter, _dumps(list(s.record_ids)), _dumps(s.filters), s.created)))

    def snapshot(self, tenant: str, snapshot_id: str) -> Snapshot | None:
        row = self._conn().execute("SELECT id, tenant, adapter, record_ids, filters, created FROM snapshots"
                                   " WHERE tenant = ? AND id = ?", (tenant, snapshot_id)).fetchone()
        if row is None:
            return None
        return Snapshot(row[0], row[1], row[2], tuple(json.loads(row[3])), json.loads(row[4]), row[5])
