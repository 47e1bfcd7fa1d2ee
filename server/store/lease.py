"""Leases in a shared document: one holder at a time does a job, taking the lease in the same conditional write
that reads it; a holder that stops renewing loses it once it expires."""

from server.store.documents import Document

LEASES_FILE = "leases.json"


def take(record: dict, holder: str, now: float, seconds: float) -> bool:
    """Takes or renews the lease kept in `record["lease"]` when it is free, expired or already `holder`'s; call it
    inside the conditional update that writes `record`."""
    lease = record.get("lease")
    if lease is None or lease["until"] < now or lease["holder"] == holder:
        record["lease"] = {"holder": holder, "until": now + seconds}
        return True
    return False


class Lease:
    """A named lease in a shared document, for a job one gateway at a time runs."""

    def __init__(self, document: Document, name: str, holder: str, seconds: float):
        self.document, self.name, self.holder, self.seconds = document, name, holder, seconds

    def acquire(self, now: float) -> bool:
        """Whether this holder has the lease now (taken or renewed)."""
        held = [False]

        def change(doc: dict) -> None:
            held[0] = take(doc.setdefault(self.name, {}), self.holder, now, self.seconds)

        self.document.update(change)
        return held[0]
