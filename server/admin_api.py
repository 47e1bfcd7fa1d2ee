"""The /admin routes: upload, list, alias, roll back and delete adapters. Every action is audited."""

import asyncio
import shutil
import tempfile
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, Field

from .auth import require_admin
from .protocol import APIError
from .registry import LATEST, Conflict, InvalidReference, NotFound, check_name
from .validation import WEIGHTS_FILE, InvalidAdapter, check_exported_manifest, unpack_archive

if TYPE_CHECKING:
    from .app import Gateway


def _gateway(request: Request) -> "Gateway":
    return request.app.state.gateway


router = APIRouter(prefix="/admin")


class AliasBody(BaseModel):
    version: int = Field(ge=1)


class RollbackBody(BaseModel):
    alias: str = "stable"


def _not_found(e: NotFound) -> APIError:
    return APIError(404, str(e), type="not_found_error", code="adapter_not_found")


def _sha(gw: "Gateway", name: str, version: int) -> str | None:
    try:
        return gw.registry.get(name, version).manifest["files"][WEIGHTS_FILE]["sha256"]
    except (NotFound, InvalidReference, KeyError):
        return None


def _summary(gw: "Gateway", name: str) -> dict:
    aliases = gw.registry.aliases(name)
    return {"name": name, "tenant": gw.registry.tenant(name), "versions": gw.registry.versions(name),
            "aliases": aliases, "latest": gw.registry.get(name, aliases[LATEST]).manifest}


@router.post("/adapters", status_code=201)
async def upload(
    request: Request,
    name: str = Form(...),
    tenant: str = Form(...),
    alias: str | None = Form(None),
    public: bool = Form(False),
    file: UploadFile = File(...),
    actor: str = Depends(require_admin),
) -> dict:
    gw = _gateway(request)
    try:
        check_name(name)
        check_name(tenant, "tenant")
    except InvalidReference as e:
        raise APIError(400, str(e), param="name" if "name" in str(e) else "tenant", code="invalid_name") from None
    work = tempfile.mkdtemp(prefix="loraplex-upload-")
    try:
        version = await asyncio.to_thread(_unpack_and_register, gw, work, file, name, tenant, public, actor)
    except (InvalidAdapter, InvalidReference) as e:
        gw.audit.record(actor, "upload", name, result=f"refused: {e}")
        raise APIError(400, str(e), param="file", code="invalid_adapter") from None
    except Conflict as e:
        gw.audit.record(actor, "upload", name, result=f"refused: {e}")
        raise APIError(409, str(e), param="name", code="adapter_conflict") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sha = version.manifest["files"][WEIGHTS_FILE]["sha256"]
    gw.audit.record(actor, "upload", name, version.version, sha, tenant=tenant)
    if alias:
        try:
            gw.registry.set_alias(name, alias, version.version)
        except InvalidReference as e:
            raise APIError(400, f"registered {version.key}, but not aliased: {e}", param="alias",
                           code="invalid_alias") from None
        gw.audit.record(actor, "alias", name, version.version, sha, alias=alias)
    return version.manifest


def _unpack_and_register(gw: "Gateway", work: str, file: UploadFile, name, tenant, public, actor):
    from pathlib import Path

    s = gw.settings
    unpacked = Path(work) / "adapter"
    unpacked.mkdir()
    file.file.seek(0)
    unpack_archive(file.file, unpacked, s.max_archive_members, s.max_unpacked_bytes)
    check_exported_manifest(unpacked, gw.base)
    return gw.registry.register(name, unpacked, base=gw.base, base_model=s.base_model, max_rank=s.max_lora_rank,
                                tenant=tenant, public=public, origin=f"upload:{file.filename}")


@router.get("/adapters")
async def list_adapters(request: Request, tenant: str | None = Query(None),
                        actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    data = []
    for name in gw.registry.names():
        try:
            summary = _summary(gw, name)
        except NotFound:
            continue  # deleted while listing
        if tenant is None or summary["tenant"] == tenant:
            data.append(summary)
    return {"object": "list", "data": data}


@router.get("/adapters/{name}")
async def show_adapter(name: str, request: Request, actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    try:
        check_name(name)
        aliases = gw.registry.aliases(name)
        versions = [gw.registry.get(name, v).manifest for v in gw.registry.versions(name)]
    except (NotFound, InvalidReference):
        raise _not_found(NotFound(f"adapter {name!r} not found")) from None
    return {"name": name, "tenant": gw.registry.tenant(name), "aliases": aliases, "versions": versions}


@router.put("/adapters/{name}/aliases/{alias}")
async def set_alias(name: str, alias: str, body: AliasBody, request: Request,
                    actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    try:
        gw.registry.set_alias(name, alias, body.version)
    except InvalidReference as e:
        raise APIError(400, str(e), param="alias", code="invalid_alias") from None
    except NotFound as e:
        raise _not_found(e) from None
    gw.audit.record(actor, "alias", name, body.version, _sha(gw, name, body.version), alias=alias)
    return {"name": name, "alias": alias, "version": body.version}


@router.post("/adapters/{name}/rollback")
async def rollback(name: str, request: Request, body: RollbackBody | None = None,
                   actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    alias = (body or RollbackBody()).alias
    try:
        version = gw.registry.rollback(name, alias)
    except (NotFound, InvalidReference) as e:
        raise _not_found(NotFound(str(e))) from None
    gw.audit.record(actor, "rollback", name, version, _sha(gw, name, version), alias=alias)
    return {"name": name, "alias": alias, "version": version}


@router.delete("/adapters/{name}/versions/{version}")
async def delete_version(name: str, version: int, request: Request, actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    sha = _sha(gw, name, version)
    try:
        trash = gw.registry.delete_version(name, version)
    except (NotFound, InvalidReference):
        raise _not_found(NotFound(f"adapter {name}@{version} not found")) from None
    gw.retire([(f"{name}@{version}", trash)])
    gw.audit.record(actor, "delete_version", name, version, sha)
    return {"name": name, "version": version, "deleted": True}


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, request: Request, actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    try:
        trashed = gw.registry.delete(name)
    except (NotFound, InvalidReference):
        raise _not_found(NotFound(f"adapter {name!r} not found")) from None
    gw.retire([(f"{name}@{v}", trash) for v, trash in trashed])
    gw.audit.record(actor, "delete", name, versions=[v for v, _ in trashed])
    return {"name": name, "versions": [v for v, _ in trashed], "deleted": True}
