"""The /admin routes that make new weights from registered ones: an exact composition registered as a version, and
a version merged into the base, answered as a tar of the model directory."""

import asyncio
import shutil
import tarfile
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from server.core.errors import APIError
from server.core.protocol import MAX_COMPOSED_SOURCES, AdapterWeight
from server.gateway.admin_routes import (
    AuditedRoute,
    Reason,
    VersionParam,
    acting_tenant,
    admin_part,
    audit_change,
    owned_by,
)
from server.gateway.auth import admin_caller
from server.registry import Version, check_new_name, parse_ref
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
    parts = [Part(await asyncio.to_thread(_source, request, caller, item.name), _weight(item.weight, i))
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


def _source(request: Request, caller: Caller, text: str) -> Version:
    ref = parse_ref(text)
    owned_by(admin_part(request), caller, ref.name)
    return admin_part(request).registry.resolve(ref)


def _weight(weight: float, index: int) -> float:
    try:
        return check_weight(weight, f"sources[{index}]")
    except ComposeError as e:
        raise APIError(400, str(e), param=f"sources.{index}.weight", code="invalid_value") from None


@router.post("/adapters/{name}/versions/{version}/merge", response_class=FileResponse,
             responses={200: {"content": {"application/x-tar": {}}}})
async def merge_version(name: str, request: Request, body: MergeBody | None = None, version: int = VersionParam,
                        reason: str | None = Reason, caller: Caller = Depends(admin_caller)) -> FileResponse:
    """The version merged into the served base, as a tar of the model directory (safetensors, config, tokenizer,
    chat template, model card), checked against base + adapter before it is answered."""
    admin, body = admin_part(request), body or MergeBody()
    owner = await asyncio.to_thread(owned_by, admin, caller, name)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loraplex-merge-"))
    try:
        target = await asyncio.to_thread(admin.registry.get, name, version)
        async with _merging:
            report = await asyncio.to_thread(merge, admin.registry, target, Path(admin.settings.base_model),
                                             work / "model", body.dtype, body.tolerance, lambda _: None)
        archive = await asyncio.to_thread(_tar, work / "model", work / f"{name}-{version}-merged.tar")
    except MergeError as e:
        await asyncio.to_thread(shutil.rmtree, work, True)
        raise APIError(400, str(e), param="dtype", code="merge_failed") from None
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, work, True)
        raise
    await audit_change(request, caller, "merge", name, version, target.manifest["files"][WEIGHTS_FILE]["sha256"],
                       tenant=owner, dtype=body.dtype, difference=report.difference)
    return FileResponse(archive, media_type="application/x-tar", filename=archive.name,
                        headers={"X-Merge-Difference": f"{report.difference:.3g}"},
                        background=BackgroundTask(shutil.rmtree, work, True))


def _tar(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return archive
