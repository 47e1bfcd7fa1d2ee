"""Writing records off the request path: a bounded queue drained in batches by one thread. A request never waits
on it; when it falls behind, what does not fit is dropped and counted."""

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from server.data import CompletionStore
from server.data.records import CompletionRecord, LedgerEntry

log = logging.getLogger("loraplex.data")
BATCH = 512
# Time a batch waits for more before it is written: records are visible within about this, well under a second.
LINGER = 0.05


class Pending(Protocol):
    """An answer noted on the request path: its ledger entry, and its record, built here off the request path."""

    @property
    def ledger(self) -> LedgerEntry: ...

    def record(self) -> CompletionRecord | None: ...


class RecordWriter:
    """Queues records and ledger entries; one thread writes them in batches."""

    def __init__(self, store: CompletionStore, capacity: int, dropped: Callable[[int], None]):
        self.store, self.dropped = store, dropped
        self._queue: queue.Queue[Pending | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    def put(self, item: Pending) -> None:
        """Never blocks: an item that does not fit is dropped and counted."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped(1)

    def close(self, timeout: float = 10.0) -> None:
        """Writes what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch, stop = self._batch()
            if batch:
                self._write(batch)
            if stop:
                return

    def _batch(self) -> tuple[list, bool]:
        batch = [self._queue.get()]
        try:
            while len(batch) < BATCH:
                batch.append(self._queue.get(timeout=LINGER))
        except queue.Empty:
            pass
        stop = None in batch
        return [item for item in batch if item is not None], stop

    def _write(self, batch: list[Pending]) -> None:
        records, ledger = [], []
        for item in batch:
            try:
                record = item.record()
            except Exception:
                log.exception("a stored completion could not be built; dropped")
                self.dropped(1)
                record = None
            ledger.append(item.ledger)
            if record is not None:
                records.append(record)
        try:
            self.store.add(records, ledger)
        except Exception:
            log.exception("writing %d stored completions and %d ledger entries failed; dropped", len(records),
                          len(ledger))
            self.dropped(len(records))
