"""The /admin routes that make new weights from registered ones: an exact composition registered as a version, and
a version merged into the base, answered as a tar of the model directory."""

import asyncio
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from server.core.errors import APIError
from server.core.protocol import MAX_COMPOSED_SOURCES, AdapterWeight
from server.gateway.admin_routes import (
    AuditedRoute,
    Reason,
    VersionParam,
    acting_tenant,
    admin_part,
    audit_change,
)
from server.gateway.auth import admin_caller
from server.registry import NotFound, Version, check_new_name, parse_ref
from server.registry.validation import WEIGHTS_FILE, InvalidAdapter
from server.tenancy.keys import Caller
from server.weights.compose import ComposeError
from server.weights.merge import Dtype, MergeError, merge
from server.weights.recipes import Part, check_weight, register_composed

router = APIRouter(prefix="/admin", route_class=AuditedRoute)
# Merging loads the base model in full precision in the gateway: one at a time.
_merging = asyncio.Lock()


class ComposeBody(BaseModel):
    sources: list[AdapterWeight] = Field(min_length=1, max_length=MAX_COMPOSED_SOURCES,
                                         description='Versions and weights: [{"name": "a@1", "weight": 0.7}, ...].')
    tenant: str | None = Field(None, description="Required of operators; a tenant-admin key's own by default.")
    public: bool = False


class MergeBody(BaseModel):
    dtype: Dtype = "float32"
    tolerance: float | None = Field(None, gt=0, description="Bound on the merged logits' largest difference from "
                                                            "base + adapter, relative to their scale (default 1e-4 "
                                                            "in float32, 2e-2 in bfloat16).")


@router.post("/adapters/{name}/compose", status_code=201)
async def compose(name: str, body: ComposeBody, request: Request, reason: str | None = Reason,
                  caller: Caller = Depends(admin_caller)) -> dict:
    """Registers the exact weighted sum of the sources' updates as the next version of `name`. A tenant-admin
    composes its own tenant's adapters only; another tenant's answers as missing."""
    admin = admin_part(request)
    request.state.adapter = name[:200]
    check_new_name(name)
    tenant = acting_tenant(caller, body.tenant, "a tenant-admin key composes for its own tenant only",
                            "required (the tenant that owns the composed adapter)")
    parts = [Part(await asyncio.to_thread(_source, request, tenant, item.name, i), _weight(item.weight, i))
             for i, item in enumerate(body.sources)]
    try:
        version = await asyncio.to_thread(
            register_composed, admin.registry, name, parts, base=admin.base, max_rank=admin.settings.max_lora_rank,
            tenant=tenant, origin="compose:" + ",".join(f"{p.version.key}:{p.weight}" for p in parts),
            public=body.public)
    except (ComposeError, InvalidAdapter) as e:
        raise APIError(400, f"sources: {e}", param="sources", code="invalid_recipe") from None
    await admin.serve_now(name)
    sha = version.manifest["files"][WEIGHTS_FILE]["sha256"]
    await audit_change(request, caller, "compose", name, version.version, sha, tenant=tenant,
                       recipe=version.manifest["recipe"])
    return version.manifest


def _source(request: Request, tenant: str, text: str, index: int) -> Version:
    """A source of the tenant's own: a composition never mixes tenants' adapters, an operator's included."""
    registry = admin_part(request).registry
    ref = parse_ref(text)
    if registry.tenant(ref.name) != tenant:
        raise NotFound(f"adapter {ref.name!r} not found", f"sources.{index}.name")
    return registry.resolve(ref)


def _weight(weight: float, index: int) -> float:
    try:
        return check_weight(weight, f"sources[{index}]")
    except ComposeError as e:
        raise APIError(400, str(e), param=f"sources.{index}.weight", code="invalid_value") from None


@router.post("/adapters/{name}/versions/{version}/merge", response_class=StreamingResponse,
             responses={200: {"content": {"application/x-tar": {}}}})
async def merge_version(name: str, request: Request, body: MergeBody | None = None, version: int = VersionParam,
                        reason: str | None = Reason, caller: Caller = Depends(admin_caller)) -> StreamingResponse:
    """The version merged into the served base, as a tar of the model directory (safetensors, config, tokenizer,
    chat template, model card), checked against base + adapter before it is answered. Operators only: the answer
    holds the base model's weights, and the merge loads the base in the gateway's memory (one at a time)."""
    if caller.tenant is not None:
        raise APIError(403, "merging is for operators: the merged model carries the base model's weights",
                       type="permission_error", code="operator_only")
    admin, body = admin_part(request), body or MergeBody()
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loraplex-merge-"))
    try:
        target = await asyncio.to_thread(admin.registry.get, name, version)
        async with _merging:
            report = await asyncio.to_thread(merge, admin.registry, target, admin.base.path,
                                             work / "model", body.dtype, body.tolerance, lambda _: None)
        archive = await asyncio.to_thread(_tar, work / "model", work / f"{name}-{version}-merged.tar")
    except BaseException as e:
        await asyncio.to_thread(shutil.rmtree, work, True)
        if isinstance(e, MergeError):
            raise APIError(400, str(e), code="merge_failed") from None
        raise
    await audit_change(request, caller, "merge", name, version, target.manifest["files"][WEIGHTS_FILE]["sha256"],
                       tenant=target.manifest.get("tenant"), dtype=body.dtype, difference=report.difference)
    return StreamingResponse(_sent_then_removed(archive, work), media_type="application/x-tar",
                             headers={"X-Merge-Difference": f"{report.difference:.3g}",
                                      "Content-Disposition": f'attachment; filename="{archive.name}"'})


async def _sent_then_removed(archive: Path, work: Path) -> AsyncIterator[bytes]:
    """The tar in pieces; the folder is removed when the answer ends, also when the client leaves early."""
    try:
        with open(archive, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                yield chunk
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


def _tar(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return archive
