"""Lineage: how many of the records a version was trained on have been erased since, so an operator knows which
versions to retrain."""

from server.data import CompletionStore


def trained_on_erased(store: CompletionStore, manifest: dict) -> int | None:
    """The count for a version trained on exports (its manifest's `snapshots`); None for one trained on none."""
    snapshots = manifest.get("snapshots") or []
    if not snapshots:
        return None
    erased = 0
    for ref in snapshots:
        snap = store.snapshot(ref["tenant"], ref["id"])
        if snap is not None:
            erased += store.erased(snap.tenant, snap.record_ids)
    return erased
