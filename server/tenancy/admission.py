"""Admission control: bounded requests in flight per engine and per tenant; past a bound, 429 at once."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from server.core.errors import APIError

if TYPE_CHECKING:
    from server.engine.routing import Backend


class Admission:
    def __init__(self, per_engine: int, per_tenant: int, retry_after: int):
        self.per_engine, self.per_tenant, self.retry_after = per_engine, per_tenant, retry_after
        self.tenants: dict[str, int] = {}

    def _refuse(self, what: str) -> APIError:
        return APIError(429, f"too many requests in flight for this {what}; retry after {self.retry_after} s",
                        type="rate_limit_error", code="too_many_requests",
                        headers={"Retry-After": str(self.retry_after)})

    @contextmanager
    def admit(self, tenant: str | None, backend: "Backend", slots: int = 1) -> Iterator[None]:
        """Counts the request against its tenant (when keys identify one) and its engine while it runs; work that
        sends several requests at once (an evaluation) holds that many slots."""
        if backend.in_flight + slots > self.per_engine:
            raise self._refuse("engine")
        if tenant is not None and self.tenants.get(tenant, 0) + slots > self.per_tenant:
            raise self._refuse("tenant")
        backend.in_flight += slots
        if tenant is not None:
            self.tenants[tenant] = self.tenants.get(tenant, 0) + slots
        try:
            yield
        finally:
            backend.in_flight -= slots
            if tenant is not None:
                self.tenants[tenant] -= slots
                if not self.tenants[tenant]:
                    del self.tenants[tenant]
