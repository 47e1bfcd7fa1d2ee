"""The /admin routes of the data loop: a tenant's data policy, and erasing a user's records and feedback. Erasure is
audited with counts, never content."""

import asyncio

from fastapi import APIRouter, Depends, Query, Request

from server.core.errors import APIError
from server.data.policy import DataPolicy, Policies
from server.gateway.admin_routes import AuditedRoute, Reason, acting_tenant, audit_change
from server.gateway.auth import admin_caller
from server.registry import check_name
from server.tenancy.keys import Caller

router = APIRouter(prefix="/admin", route_class=AuditedRoute)


def _tenant(caller: Caller, tenant: str) -> str:
    return check_name(acting_tenant(caller, tenant, "a tenant-admin key acts for its own tenant only",
                                    "required"), "tenant")


@router.get("/tenants/{tenant}/data-policy")
async def get_policy(tenant: str, request: Request, caller: Caller = Depends(admin_caller)) -> dict:
    policies: Policies = request.app.state.policies
    await asyncio.to_thread(policies.refresh)
    return {"tenant": _tenant(caller, tenant), **policies.of(tenant).model_dump()}


@router.put("/tenants/{tenant}/data-policy")
async def set_policy(tenant: str, body: DataPolicy, request: Request, reason: str | None = Reason,
                     caller: Caller = Depends(admin_caller)) -> dict:
    """Sets whether the tenant's completions are stored, for how long, and what is redacted first."""
    tenant = _tenant(caller, tenant)
    await asyncio.to_thread(request.app.state.policies.set, tenant, body)
    await audit_change(request, caller, "data_policy", None, tenant=tenant, **body.model_dump())
    return {"tenant": tenant, **body.model_dump()}


@router.delete("/data")
async def erase(request: Request, tenant: str = Query(...), user: str | None = Query(None, max_length=256),
                metadata_key: str | None = Query(None, max_length=64),
                metadata_value: str | None = Query(None, max_length=512), reason: str | None = Reason,
                caller: Caller = Depends(admin_caller)) -> dict:
    """Erases every stored completion of a user (or with a metadata pair) and the feedback on them, in every
    replica's store; the ids are kept (nothing else) so versions trained on them can be found."""
    tenant = _tenant(caller, tenant)
    if (user is None) == (metadata_key is None) or (metadata_key is None) != (metadata_value is None):
        raise APIError(400, "name either user, or metadata_key with metadata_value", param="user",
                       code="missing_required_parameter")
    pair = (metadata_key, metadata_value) if metadata_key is not None else None
    erased = await asyncio.to_thread(request.app.state.data.erase, tenant, user=user, metadata=pair)
    await audit_change(request, caller, "erase", None, tenant=tenant, records=len(erased),
                       by="user" if user is not None else "metadata")
    return {"object": "erasure", "tenant": tenant, "records": len(erased)}
