"""Writing records off the request path: a bounded buffer drained in batches by one thread. A request never waits
on it; when it falls behind, what does not fit is dropped and counted."""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from server.data import CompletionStore
from server.data.records import CompletionRecord, LedgerEntry

log = logging.getLogger("loraplex.data")
BATCH = 512
# Time a batch gathers before it is written: records are visible within about this, well under a second.
LINGER = 0.05


class Pending(Protocol):
    """An answer noted on the request path: its ledger entry, and its record, built here off the request path."""

    @property
    def ledger(self) -> LedgerEntry: ...

    def record(self) -> CompletionRecord | None: ...


class RecordWriter:
    """Buffers records and ledger entries; one thread writes them in batches.

    The thread is woken once per batch, not once per answer: a wake-up per answer had the writer and the event loop
    trade the GIL on every request (3% of the gateway's CPU per request at 32 streams, BENCHMARKS.md)."""

    def __init__(self, store: CompletionStore, capacity: int, dropped: Callable[[int], None]):
        self.store, self.dropped, self.capacity = store, dropped, capacity
        self._items: deque[Pending] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    def put(self, item: Pending) -> None:
        """Never blocks: an item that does not fit is dropped and counted."""
        if len(self._items) >= self.capacity:
            self.dropped(1)
            return
        self._items.append(item)
        if not self._wake.is_set():
            self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Writes what is buffered, then stops."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._stopping:
                time.sleep(LINGER)  # let the batch gather
            # Cleared before the drain: an item put after it sets the event again, so none waits for the next one.
            self._wake.clear()
            while self._items:
                self._write([self._items.popleft() for _ in range(min(BATCH, len(self._items)))])
            if self._stopping:
                return

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
