"""The /admin routes: upload, list, alias, roll back and delete adapters. Every change and every refusal is audited
(refused tokens by the Credentials middleware, refused requests by AuditedRoute)."""

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from .archive import Limits, unpack_isolated
from .auth import require_admin
from .gateway import Gateway
from .protocol import APIError
from .registry import LATEST, MAX_VERSION, Conflict, InvalidReference, NotFound, RegistryError, Version, check_name
from .validation import WEIGHTS_FILE, InvalidAdapter, check_exported_manifest


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


class AuditedRoute(APIRoute):
    """An admin route whose refusals (4xx) are audited as well as its changes."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def audited(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, RegistryError, RequestValidationError) as e:
                error = registry_error(e) if isinstance(e, RegistryError) else e
                status = error.status if isinstance(error, APIError) else 400
                message = error.message if isinstance(error, APIError) else str(error.errors()[:1])
                client = request.client.host if request.client else "unknown"
                adapter = request.path_params.get("name") or getattr(request.state, "adapter", None)
                await _gateway(request).audit.arecord(f"admin@{client}", self.name, adapter and str(adapter)[:200],
                                                      result=f"refused: {status} {message}"[:1000])
                raise

        return audited


router = APIRouter(prefix="/admin", route_class=AuditedRoute)
VersionParam = PathParam(ge=1, le=MAX_VERSION)


class AliasBody(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)


class RollbackBody(BaseModel):
    alias: str = "stable"


class CanaryBody(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    weight: float = Field(gt=0, lt=100, description="Percent of the alias's callers sent to `version`.")


def registry_error(e: RegistryError) -> APIError:
    """The one mapping of the registry's errors to answers, registered as the app's handler for them."""
    if isinstance(e, NotFound):
        return APIError(404, str(e), type="not_found_error", param=e.param, code="adapter_not_found")
    if isinstance(e, Conflict):
        return APIError(409, str(e), param=e.param, code="adapter_conflict")
    return APIError(400, str(e), param=e.param, code="invalid_reference")


def _sha(gw: Gateway, name: str, version: int) -> str | None:
    try:
        return gw.registry.get(name, version).manifest["files"][WEIGHTS_FILE]["sha256"]
    except (NotFound, InvalidReference, KeyError):
        return None


def _summary(gw: Gateway, name: str) -> dict:
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
    request.state.adapter = name[:200]
    check_name(name)
    check_name(tenant, "tenant")
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loraplex-upload-"))
    try:
        unpacked = await _unpack(gw, file, work)
        version = await asyncio.to_thread(_register, gw, unpacked, name, tenant, public, file.filename)
    except InvalidAdapter as e:
        raise APIError(400, str(e), param="file", code="invalid_adapter") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    sha = version.manifest["files"][WEIGHTS_FILE]["sha256"]
    await gw.audit.arecord(actor, "upload", name, version.version, sha, tenant=tenant)
    if alias:
        try:
            await asyncio.to_thread(gw.registry.set_alias, name, alias, version.version)
        except InvalidReference as e:
            raise InvalidReference(f"registered {version.key}, but not aliased: {e}", "alias") from None
        await gw.audit.arecord(actor, "alias", name, version.version, sha, alias=alias)
    return version.manifest


async def _unpack(gw: Gateway, file: UploadFile, work: Path) -> Path:
    """Unpacks the upload in a child process of its own, a few at a time, bounded in time and memory."""
    s = gw.settings
    unpacked = work / "adapter"
    unpacked.mkdir()
    async with gw.archive_slots:
        await unpack_isolated(file.file, unpacked, Limits(s.max_archive_members, s.max_unpacked_bytes),
                              s.archive_timeout, s.archive_memory)
    return unpacked


def _register(gw: Gateway, unpacked: Path, name: str, tenant: str, public: bool, filename: str | None) -> Version:
    check_exported_manifest(unpacked, gw.base)
    return gw.registry.register(name, unpacked, base=gw.base, max_rank=gw.settings.max_lora_rank, tenant=tenant,
                                public=public, origin=f"upload:{(filename or '')[:200]}")


@router.get("/adapters")
async def list_adapters(request: Request, tenant: str | None = Query(None),
                        actor: str = Depends(require_admin)) -> dict:
    return await asyncio.to_thread(_list, _gateway(request), tenant)


def _list(gw: Gateway, tenant: str | None) -> dict:
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

    def show() -> dict:
        check_name(name)
        aliases, canaries = gw.registry.alias_table(name)
        versions = [gw.registry.get(name, v).manifest for v in gw.registry.versions(name)]
        return {"name": name, "tenant": gw.registry.tenant(name), "aliases": aliases, "canaries": canaries,
                "versions": versions}

    return await asyncio.to_thread(show)


@router.put("/adapters/{name}/aliases/{alias}")
async def set_alias(name: str, alias: str, body: AliasBody, request: Request,
                    actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    await asyncio.to_thread(gw.registry.set_alias, name, alias, body.version)
    sha = await asyncio.to_thread(_sha, gw, name, body.version)
    await gw.audit.arecord(actor, "alias", name, body.version, sha, alias=alias)
    return {"name": name, "alias": alias, "version": body.version}


@router.put("/adapters/{name}/aliases/{alias}/canary")
async def set_canary(name: str, alias: str, body: CanaryBody, request: Request,
                     actor: str = Depends(require_admin)) -> dict:
    """Sends `weight`% of the alias's callers (the same ones while the weight stays) to `version`."""
    gw = _gateway(request)
    await asyncio.to_thread(gw.registry.set_canary, name, alias, body.version, body.weight)
    sha = await asyncio.to_thread(_sha, gw, name, body.version)
    await gw.audit.arecord(actor, "canary", name, body.version, sha, alias=alias, weight=body.weight)
    return {"name": name, "alias": alias, "canary": {"version": body.version, "weight": body.weight}}


@router.post("/adapters/{name}/aliases/{alias}/promote")
async def promote(name: str, alias: str, request: Request, actor: str = Depends(require_admin)) -> dict:
    """Points the alias at its canary's version, for every caller."""
    gw = _gateway(request)
    version = await asyncio.to_thread(gw.registry.promote, name, alias)
    sha = await asyncio.to_thread(_sha, gw, name, version)
    await gw.audit.arecord(actor, "promote", name, version, sha, alias=alias)
    return {"name": name, "alias": alias, "version": version}


@router.post("/adapters/{name}/aliases/{alias}/abort")
async def abort(name: str, alias: str, request: Request, actor: str = Depends(require_admin)) -> dict:
    """Ends the alias's canary: every caller gets the version the alias points at."""
    gw = _gateway(request)
    version = await asyncio.to_thread(gw.registry.abort, name, alias)
    await gw.audit.arecord(actor, "abort", name, version, alias=alias)
    return {"name": name, "alias": alias, "version": version}


@router.post("/adapters/{name}/rollback")
async def rollback(name: str, request: Request, body: RollbackBody | None = None,
                   actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    alias = (body or RollbackBody()).alias
    version = await asyncio.to_thread(gw.registry.rollback, name, alias)
    sha = await asyncio.to_thread(_sha, gw, name, version)
    await gw.audit.arecord(actor, "rollback", name, version, sha, alias=alias)
    return {"name": name, "alias": alias, "version": version}


@router.delete("/adapters/{name}/versions/{version}")
async def delete_version(name: str, request: Request, version: int = VersionParam,
                         actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    sha = await asyncio.to_thread(_sha, gw, name, version)
    await asyncio.to_thread(gw.registry.delete_version, name, version)
    gw.retire([f"{name}@{version}"])
    await gw.audit.arecord(actor, "delete_version", name, version, sha)
    return {"name": name, "version": version, "deleted": True}


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, request: Request, actor: str = Depends(require_admin)) -> dict:
    gw = _gateway(request)
    versions = await asyncio.to_thread(gw.registry.delete, name)
    gw.retire([f"{name}@{v}" for v in versions])
    await gw.audit.arecord(actor, "delete", name, versions=versions)
    return {"name": name, "versions": versions, "deleted": True}
