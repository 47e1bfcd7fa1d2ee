"""Retention: stored completions past their tenant's retention, and ledger entries past the ledger's, deleted by
one gateway at a time (a lease), measured, and audited with counts only."""

import asyncio
import logging
import time

from server.core.periodic import every
from server.data import CompletionStore
from server.data.policy import Policies
from server.observability.audit import AuditLog
from server.store.lease import Lease

log = logging.getLogger("loraplex.data")


class Retention:
    """Every `interval` seconds, the gateway holding the lease deletes what is past retention."""

    def __init__(self, *, store: CompletionStore, policies: Policies, lease: Lease, audit: AuditLog,
                 interval: float, ledger_seconds: float):
        self.store, self.policies, self.lease, self.audit = store, policies, lease, audit
        self.interval, self.ledger_seconds = interval, ledger_seconds

    async def run(self) -> None:
        await every(self.interval, lambda: asyncio.to_thread(self.sweep), "deleting data past retention failed")

    def sweep(self) -> dict[str, int] | None:
        """Deletes what is past retention; the counts per tenant, or None when another gateway holds the lease."""
        now = time.time()
        if not self.lease.acquire(now):
            return None
        started = time.perf_counter()
        counts = {}
        for tenant in self.store.tenants():
            policy = self.policies.of(tenant)
            counts[tenant] = self.store.expire(tenant, now - policy.retention_seconds)
            if counts[tenant]:
                self.audit.record("gateway:retention", "retention", tenant=tenant, records=counts[tenant],
                                  retention=policy.retention)
        ledger = self.store.expire_ledger(now - self.ledger_seconds)
        log.info("retention: deleted %d stored completions and %d ledger entries in %.3f s", sum(counts.values()),
                 ledger, time.perf_counter() - started)
        return {**counts, "(ledger)": ledger}
