"""The /admin routes: upload, list, alias, roll back and delete adapters. Every change and every refusal is audited
(refused tokens by the Credentials middleware, refused requests by AuditedRoute), under the caller's name.

Operators act on every adapter; a tenant-admin key on its own tenant's only, and another tenant's adapter answers
exactly as a missing one does."""

import asyncio
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from server.core.base_model import BaseModelInfo
from server.core.config import Settings
from server.core.durations import parse_since
from server.core.errors import APIError
from server.core.examples import DataError, parse_row
from server.data import CompletionStore
from server.data.lineage import trained_on_erased
from server.engine.retirement import Retirement
from server.gateway.auth import admin_caller
from server.gateway.client_watch import ClientWatch, client_left
from server.gateway.errors import registry_error
from server.gateway.evaluations import Evaluator
from server.observability.audit import AuditLog
from server.registry import (
    LATEST,
    MAX_VERSION,
    InvalidReference,
    NotFound,
    Registry,
    RegistryError,
    Version,
    check_name,
    check_new_name,
)
from server.registry.archive import Limits, unpack_isolated
from server.registry.hub import SCHEME, HubError, HubSource, allowed, fetch
from server.registry.validation import WEIGHTS_FILE, InvalidAdapter, check_exported_manifest
from server.registry.view import RegistryView
from server.rollout.evaluation import MAX_GENERAL_TEXT, MAX_ROWS, EvalOptions, EvalSet, table
from server.rollout.rollouts import Rollouts, RolloutSpec
from server.tenancy.keys import Caller
from server.tenancy.usage import UsageLedger



@dataclass(kw_only=True)
class Admin:
    """The parts /admin reads and changes."""

    settings: Settings
    base: BaseModelInfo
    registry: Registry
    view: RegistryView
    audit: AuditLog
    rollouts: Rollouts
    usage: UsageLedger
    evaluator: Evaluator
    retire: Retirement
    archive_slots: asyncio.Semaphore  # LORAPLEX_ARCHIVE_WORKERS uploads unpacked at once
    data: CompletionStore

    async def serve_now(self, name: str, deleted: Sequence[str] = ()) -> None:
        """Serves a change this gateway made at once (the others take it at their next reading), and unloads the
        versions it deleted from the engines. A failed reading is logged: the change stands, the next reading
        catches up."""
        try:
            gone = await self.view.areload(name)
        except Exception:
            log.exception("reading %s after a change failed; it is served from the next reading", name)
            gone = []
        rest = [key for key in deleted if key not in gone]
        if rest:
            self.retire(rest)


def admin_part(request: Request) -> Admin:
    return request.app.state.admin


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
                caller: Caller = request.state.caller
                adapter = request.path_params.get("name") or getattr(request.state, "adapter", None)
                await admin_part(request).audit.arecord(caller.actor, self.name, adapter and str(adapter)[:200],
                                                        result=f"refused: {status} {message}"[:1000],
                                                        tenant=caller.tenant, reason=request.query_params.get("reason"))
                raise

        return audited


router = APIRouter(prefix="/admin", route_class=AuditedRoute)
log = logging.getLogger("loraplex.admin")
VersionParam = PathParam(ge=1, le=MAX_VERSION)
Reason = Query(None, max_length=1000, description="Why, for the audit log.")


def owned_by(admin: Admin, caller: Caller, name: str) -> str | None:
    """The adapter's tenant; for a tenant-admin, another tenant's adapter is refused exactly as a missing one."""
    owner = admin.registry.tenant(check_name(name))
    if caller.tenant is not None and owner != caller.tenant:
        raise NotFound(f"adapter {name!r} not found")
    return owner


async def audit_change(request: Request, caller: Caller, action: str, name: str, version: int | None = None,
                       sha256: str | None = None, **detail) -> None:
    """One audit line for a change, under the caller's name, with its reason if it gave one."""
    await admin_part(request).audit.arecord(caller.actor, action, name, version, sha256,
                                            reason=request.query_params.get("reason"), **detail)


class AliasBody(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)


class ShadowBody(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    percent: float = Field(gt=0, le=100, description="Percent of the alias's non-streamed requests copied.")


class RollbackBody(BaseModel):
    alias: str = "stable"


class EvalBody(EvalOptions):
    rows: list[dict] = Field(min_length=1, max_length=MAX_ROWS, description="Held-out rows, in any format the "
                                                                         "trainer reads (chat, prompt/completion, "
                                                                         "Alpaca).")
    general_text: str | None = Field(None, max_length=MAX_GENERAL_TEXT, description="Plain text whose perplexity "
                                                                                    "shows forgetting.")
    against: str = Field("base", max_length=100, description='"base", an alias, or a version number.')


class CanaryBody(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)
    weight: float = Field(gt=0, lt=100, description="Percent of the alias's callers sent to `version`.")


def _sha(admin: Admin, name: str, version: int) -> str | None:
    try:
        return admin.registry.get(name, version).manifest["files"][WEIGHTS_FILE]["sha256"]
    except (NotFound, InvalidReference, KeyError):
        return None


def _summary(admin: Admin, name: str) -> dict:
    aliases = admin.registry.aliases(name)
    return {"name": name, "tenant": admin.registry.tenant(name), "versions": admin.registry.versions(name),
            "aliases": aliases, "latest": admin.registry.get(name, aliases[LATEST]).manifest}


@router.post("/adapters", status_code=201)
async def upload(
    request: Request,
    name: str = Form(...),
    tenant: str | None = Form(None, description="Required of operators; a tenant-admin key's own by default."),
    alias: str | None = Form(None),
    public: bool = Form(False),
    file: UploadFile | None = File(None, description="The adapter: a .tar.gz or .zip of its directory; or `source`."),
    source: str | None = Form(None, description="hf://ORG/REPO: the adapter from the Hugging Face Hub instead of "
                                                "a file, pinned to the commit `revision` names now."),
    revision: str | None = Form(None, description="With `source`: branch, tag, commit or refs/pr/N (default main)."),
    subfolder: str | None = Form(None, description="With `source`: the adapter's folder in the repository."),
    hub_token: str | None = Header(None, alias="X-Hub-Token", description="With `source`: the Hub token to fetch "
                                   "with, used and never stored; a tenant-admin's upload uses no other."),
    eval_data: UploadFile | None = File(None, description="JSONL held-out rows: the version is evaluated against "
                                                          "the base on arrival."),
    general_text: UploadFile | None = File(None, description="Plain text for the forgetting measure."),
    promote: Literal["never", "auto"] = Form("never", description='"auto": point `stable` at the version if its '
                                                                  "evaluation passes."),
    max_forgetting: float = Form(0.05, ge=0),
    reason: str | None = Reason,
    caller: Caller = Depends(admin_caller),
) -> dict:
    admin = admin_part(request)
    request.state.adapter = name[:200]
    check_new_name(name)
    tenant = _upload_tenant(caller, tenant)
    # Eval data is checked before anything is stored, so that a bad file registers nothing.
    evalset = await _arrival_eval_set(eval_data, general_text, promote, max_forgetting)
    hub = _hub_fetch(file, source, revision, subfolder, hub_token)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="loraplex-upload-"))
    try:
        if hub is None:
            files, origin, extra = await _unpack(admin, file, work), f"upload:{(file.filename or '')[:200]}", {}
        else:
            files, origin, extra = await _from_hub(admin, caller, hub, work)
        version = await asyncio.to_thread(_register, admin, files, name, tenant, public, origin, extra)
        await admin.serve_now(name)
    except InvalidAdapter as e:
        raise APIError(400, str(e), param="file" if source is None else "source", code="invalid_adapter") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    return await _arrived(request, caller, version, alias, evalset, promote)


async def _arrived(request: Request, caller: Caller, version: Version, alias: str | None, evalset: EvalSet | None,
                   promote: str) -> dict:
    """An upload registered: audited, aliased if it asks, evaluated if it brought eval data; its manifest."""
    sha, tenant = version.manifest["files"][WEIGHTS_FILE]["sha256"], version.manifest["tenant"]
    await audit_change(request, caller, "upload", version.name, version.version, sha, tenant=tenant)
    if alias:
        await _alias_upload(request, caller, version, alias, sha, tenant)
    if evalset is None:
        return version.manifest
    return {**version.manifest, "evaluation": await _evaluate_arrival(request, caller, version, evalset, promote)}


async def _alias_upload(request: Request, caller: Caller, version: Version, alias: str, sha: str,
                        tenant: str | None) -> None:
    """Points `alias` at the version just uploaded; a refused alias leaves the version registered, and says so."""
    try:
        await asyncio.to_thread(admin_part(request).registry.set_alias, version.name, alias, version.version)
        await admin_part(request).serve_now(version.name)
    except InvalidReference as e:
        raise InvalidReference(f"registered {version.key}, but not aliased: {e}", "alias") from None
    await audit_change(request, caller, "alias", version.name, version.version, sha, tenant=tenant, alias=alias)


async def _evaluate_arrival(request: Request, caller: Caller, version: Version, evalset: EvalSet,
                            promote: str) -> dict:
    """An upload's evaluation against the base; with `promote: auto`, `stable` moves to it only if it passes."""
    name, tenant = version.name, version.manifest["tenant"]
    evaluation = await _evaluate(request, caller, name, version.version, evalset, "base", tenant)
    if promote == "auto":
        if evaluation["passed"]:
            await asyncio.to_thread(admin_part(request).registry.set_alias, name, "stable", version.version)
            await admin_part(request).serve_now(name)
        await audit_change(request, caller, "promote_auto", name, version.version,
                           version.manifest["files"][WEIGHTS_FILE]["sha256"], tenant=tenant, alias="stable",
                           result="ok" if evaluation["passed"] else f"refused: {evaluation['verdict']}")
    return evaluation


MAX_EVAL_UPLOAD = 16 * 2**20


async def _arrival_eval_set(eval_data: UploadFile | None, general_text: UploadFile | None, promote: str,
                            max_forgetting: float) -> EvalSet | None:
    """The eval set an upload names, read and parsed; None when it names none."""
    if eval_data is None:
        if promote == "auto":
            raise APIError(400, "promote: auto needs eval_data, the held-out rows the version must pass",
                           param="promote", code="missing_required_parameter")
        return None
    content = await eval_data.read(MAX_EVAL_UPLOAD + 1)
    text = (await general_text.read(MAX_EVAL_UPLOAD + 1)) if general_text is not None else None
    if len(content) > MAX_EVAL_UPLOAD or (text is not None and len(text) > MAX_EVAL_UPLOAD):
        raise APIError(413, f"eval_data and general_text: at most {MAX_EVAL_UPLOAD} bytes each",
                       param="eval_data", code="eval_data_too_large")
    rows = _jsonl_rows(content, "eval_data")
    general = text.decode("utf-8", errors="replace") if text is not None else None
    return _eval_set(rows, general, EvalOptions(max_forgetting=max_forgetting), "eval_data")


def _in_scope(caller: Caller, tenant: str | None) -> bool:
    """Whether the caller may act for `tenant` (None: whichever its key allows)."""
    return caller.tenant is None or tenant in (None, caller.tenant)


def acting_tenant(caller: Caller, tenant: str | None, refused: str, required: str) -> str:
    """The tenant a request acts for: the one it names, else a tenant-admin key's own; another one is refused."""
    if not _in_scope(caller, tenant):
        raise APIError(403, f"tenant: {refused}", type="permission_error", param="tenant", code="other_tenant")
    tenant = tenant or caller.tenant
    if tenant is None:
        raise APIError(400, f"tenant: {required}", param="tenant", code="missing_required_parameter")
    return tenant


def _upload_tenant(caller: Caller, tenant: str | None) -> str:
    return check_name(acting_tenant(caller, tenant, "a tenant-admin key registers adapters for its own tenant only",
                                     "required (the tenant that owns the adapter)"), "tenant")


async def _unpack(admin: Admin, file: UploadFile, work: Path) -> Path:
    """Unpacks the upload in a child process of its own, a few at a time, bounded in time and memory."""
    s = admin.settings
    unpacked = work / "adapter"
    unpacked.mkdir()
    async with admin.archive_slots:
        await unpack_isolated(file.file, unpacked, Limits(s.max_archive_members, s.max_unpacked_bytes),
                              s.archive_timeout, s.archive_memory)
    return unpacked


@dataclass(frozen=True)
class HubFetch:
    """What an upload from the Hub names; the token is used for this fetch only, never stored or logged."""

    source: str
    revision: str | None
    subfolder: str | None
    token: str | None = field(repr=False)


def _hub_fetch(file: UploadFile | None, source: str | None, revision: str | None, subfolder: str | None,
               token: str | None) -> HubFetch | None:
    """What an upload names: a file (None), or a Hub source with its revision, folder and token."""
    if (file is None) == (source is None):
        raise APIError(400, "file or source: give one, the adapter's archive or its hf:// repository",
                       param="file", code="missing_required_parameter")
    if file is not None and (revision or subfolder or token):
        raise APIError(400, "revision, subfolder and X-Hub-Token go with source, not file", param="revision",
                       code="invalid_value")
    return None if source is None else HubFetch(source, revision, subfolder, token)


async def _from_hub(admin: Admin, caller: Caller, hub: HubFetch, work: Path) -> tuple[Path, str, dict]:
    """Fetches a Hub adapter at the commit its revision names now. A tenant-admin fetches only repositories its
    tenant's LORAPLEX_HUB_ALLOW names, with only the token it sent: the gateway lends no access of its own."""
    try:
        where = HubSource.parse(hub.source, hub.revision, hub.subfolder)
    except HubError as e:
        raise APIError(400, f"source: {e}", param="source", code="invalid_source") from None
    allow = None if caller.tenant is None else admin.settings.hub_allow.get(caller.tenant, [])
    if allow is not None:
        _check_allowed(where, allow, caller.tenant)
    token = hub.token or (None if caller.tenant is None else False)
    try:
        async with admin.archive_slots:
            files, record = await asyncio.to_thread(fetch, where, work, token=token,
                                                    max_bytes=admin.settings.max_unpacked_bytes, allow=allow)
    except HubError as e:
        status = 413 if e.too_large else 403 if e.not_allowed else 400
        raise APIError(status, f"source: {e}", param="source",
                       code="request_too_large" if e.too_large else "invalid_source") from None
    return files, f"{SCHEME}{record['repo']}@{record['sha']}", {"hub": record}


def _check_allowed(where: HubSource, allow: list[str], tenant: str) -> None:
    """A tenant-admin's source: a repository its tenant's allow-list names, at a revision its owners made (a pull
    request's ref carries whoever opened it)."""
    if not allowed(where.repo, allow):
        raise APIError(403, f"source: {SCHEME}{where.repo} is not in tenant {tenant}'s LORAPLEX_HUB_ALLOW",
                       type="permission_error", param="source", code="source_not_allowed")
    if where.revision.startswith("refs/pr/"):
        raise APIError(403, "revision: a pull request's ref is for operators (its content is whoever opened it)",
                       type="permission_error", param="revision", code="source_not_allowed")


def _register(admin: Admin, files: Path, name: str, tenant: str, public: bool, origin: str, extra: dict) -> Version:
    check_exported_manifest(files, admin.base)
    return admin.registry.register(name, files, base=admin.base, max_rank=admin.settings.max_lora_rank,
                                   tenant=tenant, public=public, origin=origin, extra=extra)


def _eval_set(rows: list, general_text: str | None, options: EvalOptions, where: str) -> EvalSet:
    """Rows parsed as the trainer parses them; a bad one is refused naming it (`where` and its index or line)."""
    if len(rows) > MAX_ROWS:
        raise APIError(400, f"{where}: {len(rows)} rows, more than the {MAX_ROWS} an evaluation may score",
                       param=where, code="invalid_eval_data")
    if general_text is not None and len(general_text) > MAX_GENERAL_TEXT:
        raise APIError(400, f"general_text: more than the {MAX_GENERAL_TEXT} characters an evaluation may score",
                       param="general_text", code="invalid_eval_data")
    try:
        examples = [parse_row(row, f"{where}[{i}]") for i, row in enumerate(rows)]
    except DataError as e:
        raise APIError(400, str(e), param=where, code="invalid_eval_data") from None
    return EvalSet(examples, general_text, options)


def _jsonl_rows(content: bytes, where: str) -> list:
    rows = []
    for n, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise APIError(400, f"{where}:{n}: not valid JSON ({e.msg})", param=where,
                               code="invalid_eval_data") from None
    if not rows:
        raise APIError(400, f"{where}: no rows", param=where, code="invalid_eval_data")
    return rows


async def _evaluate(request: Request, caller: Caller, name: str, version: int, evalset: EvalSet, against: str,
                    tenant: str | None) -> dict:
    """Scores the version on an engine, keeps the summary beside it (the rollout gate reads it) and audits it."""
    admin = admin_part(request)
    # Its engine calls are abandoned (and so aborted by vLLM) when the caller leaves.
    async with ClientWatch(request.receive)(leaving=client_left):
        result = await admin.evaluator.evaluate(name, version, evalset, against, tenant)
    result["table"] = table(result)
    summary = {k: v for k, v in result.items() if k != "table"}
    summary["reference"], summary["candidate"] = (
        {k: v for k, v in summary[side].items() if k != "samples"} for side in ("reference", "candidate"))
    summary["time"] = time.time()
    await asyncio.to_thread(admin.registry.record_evaluation, name, version, summary)
    await audit_change(request, caller, "eval", name, version, await asyncio.to_thread(_sha, admin, name, version),
                       tenant=tenant, against=result["reference_model"], passed=result["passed"],
                       verdict=result["verdict"])
    return result


@router.post("/adapters/{name}/versions/{version}/eval")
async def evaluate(name: str, body: EvalBody, request: Request, version: int = VersionParam,
                   reason: str | None = Reason, caller: Caller = Depends(admin_caller)) -> dict:
    """Scores a version through the engine (held-out loss, exact match, ROUGE-L, forgetting) beside `against`."""
    owner = await asyncio.to_thread(owned_by, admin_part(request), caller, name)
    options = EvalOptions(**body.model_dump(include=set(EvalOptions.model_fields)))
    evalset = _eval_set(body.rows, body.general_text, options, "rows")
    return await _evaluate(request, caller, name, version, evalset, body.against, owner)


@router.get("/adapters")
async def list_adapters(request: Request, tenant: str | None = Query(None),
                        caller: Caller = Depends(admin_caller)) -> dict:
    """Every adapter, or one tenant's; a tenant-admin sees its own tenant's only."""
    if not _in_scope(caller, tenant):
        return {"object": "list", "data": []}
    return await asyncio.to_thread(_list, admin_part(request), caller.tenant or tenant)


def _list(admin: Admin, tenant: str | None) -> dict:
    data = []
    for name in admin.registry.names():
        try:
            summary = _summary(admin, name)
        except NotFound:
            continue  # deleted while listing
        if tenant is None or summary["tenant"] == tenant:
            data.append(summary)
    return {"object": "list", "data": data}


@router.get("/adapters/{name}")
async def show_adapter(name: str, request: Request, caller: Caller = Depends(admin_caller)) -> dict:
    admin = admin_part(request)

    def show() -> dict:
        owner = owned_by(admin, caller, name)
        aliases, canaries = admin.registry.alias_table(name)
        present = admin.registry.versions(name)
        versions = [_with_lineage(admin, admin.registry.get(name, v).manifest) for v in present]
        shadows = {a: s for a, s in admin.registry.shadows(name).items() if s["version"] in present}
        evaluations = {v: e for v, e in admin.registry.evaluations(name).items() if v in present}
        return {"name": name, "tenant": owner, "aliases": aliases, "canaries": canaries, "shadows": shadows,
                "rollouts": admin.rollouts.of(name), "evaluations": evaluations, "versions": versions}

    return await asyncio.to_thread(show)


def _with_lineage(admin: Admin, manifest: dict) -> dict:
    """A version's manifest, marked `trained_on_erased: N` when it was trained on exported records."""
    erased = trained_on_erased(admin.data, manifest)
    return manifest if erased is None else {**manifest, "trained_on_erased": erased}


async def _change(request: Request, caller: Caller, action: str, name: str, apply: Callable[[], int | None],
                  version: int | None = None, **detail) -> int | None:
    """One alias change: the caller's scope checked, `apply` run off the event loop, then audited with the version
    it names (`version`, else what `apply` returned) and that version's sha256; returns what `apply` returned."""
    admin = admin_part(request)
    owner = await asyncio.to_thread(owned_by, admin, caller, name)
    result = await asyncio.to_thread(apply)
    await admin.serve_now(name)
    named = version if version is not None else result
    sha = await asyncio.to_thread(_sha, admin, name, named) if named is not None else None
    await audit_change(request, caller, action, name, named, sha, tenant=owner, **detail)
    return result


@router.put("/adapters/{name}/aliases/{alias}")
async def set_alias(name: str, alias: str, body: AliasBody, request: Request, reason: str | None = Reason,
                    caller: Caller = Depends(admin_caller)) -> dict:
    registry = admin_part(request).registry
    await _change(request, caller, "alias", name, lambda: registry.set_alias(name, alias, body.version),
                  body.version, alias=alias)
    return {"name": name, "alias": alias, "version": body.version}


@router.put("/adapters/{name}/aliases/{alias}/canary")
async def set_canary(name: str, alias: str, body: CanaryBody, request: Request, reason: str | None = Reason,
                     caller: Caller = Depends(admin_caller)) -> dict:
    """Sends `weight`% of the alias's callers (the same ones while the weight stays) to `version`."""
    registry = admin_part(request).registry
    await _change(request, caller, "canary", name, lambda: registry.set_canary(name, alias, body.version, body.weight),
                  body.version, alias=alias, weight=body.weight)
    return {"name": name, "alias": alias, "canary": {"version": body.version, "weight": body.weight}}


@router.post("/adapters/{name}/aliases/{alias}/promote")
async def promote(name: str, alias: str, request: Request, reason: str | None = Reason,
                  caller: Caller = Depends(admin_caller)) -> dict:
    """Points the alias at its canary's version, for every caller."""
    registry = admin_part(request).registry
    version = await _change(request, caller, "promote", name, lambda: registry.promote(name, alias), alias=alias)
    return {"name": name, "alias": alias, "version": version}


@router.post("/adapters/{name}/aliases/{alias}/rollout", status_code=201)
async def start_rollout(name: str, alias: str, body: RolloutSpec, request: Request, reason: str | None = Reason,
                        caller: Caller = Depends(admin_caller)) -> dict:
    """Rolls `to` out step by step while it keeps within bounds of the alias's version; rolls back when not."""
    rollouts, started = admin_part(request).rollouts, {}
    await _change(request, caller, "rollout_start", name,
                  lambda: started.update(rollouts.start(name, alias, body, caller.actor)), body.to, alias=alias,
                  weight=body.steps[0], steps=body.steps, interval=body.interval)
    return started


@router.put("/adapters/{name}/aliases/{alias}/shadow")
async def set_shadow(name: str, alias: str, body: ShadowBody, request: Request, reason: str | None = Reason,
                     caller: Caller = Depends(admin_caller)) -> dict:
    """Sends a copy of `percent`% of the alias's non-streamed requests to `version`: compared, timed, not served."""
    registry = admin_part(request).registry
    await _change(request, caller, "shadow", name,
                  lambda: registry.set_shadow(name, alias, body.version, body.percent), body.version, alias=alias,
                  percent=body.percent)
    return {"name": name, "alias": alias, "shadow": {"version": body.version, "percent": body.percent}}


@router.delete("/adapters/{name}/aliases/{alias}/shadow")
async def end_shadow(name: str, alias: str, request: Request, reason: str | None = Reason,
                     caller: Caller = Depends(admin_caller)) -> dict:
    registry = admin_part(request).registry
    await _change(request, caller, "shadow_end", name, lambda: registry.end_shadow(name, alias), alias=alias)
    return {"name": name, "alias": alias, "shadow": None}


@router.post("/adapters/{name}/aliases/{alias}/abort")
async def abort(name: str, alias: str, request: Request, reason: str | None = Reason,
                caller: Caller = Depends(admin_caller)) -> dict:
    """Ends the alias's canary: every caller gets the version the alias points at."""
    registry = admin_part(request).registry
    version = await _change(request, caller, "abort", name, lambda: registry.abort(name, alias), alias=alias)
    return {"name": name, "alias": alias, "version": version}


@router.post("/adapters/{name}/rollback")
async def rollback(name: str, request: Request, body: RollbackBody | None = None, reason: str | None = Reason,
                   caller: Caller = Depends(admin_caller)) -> dict:
    registry, alias = admin_part(request).registry, (body or RollbackBody()).alias
    version = await _change(request, caller, "rollback", name, lambda: registry.rollback(name, alias), alias=alias)
    return {"name": name, "alias": alias, "version": version}


@router.delete("/adapters/{name}/versions/{version}")
async def delete_version(name: str, request: Request, version: int = VersionParam, reason: str | None = Reason,
                         caller: Caller = Depends(admin_caller)) -> dict:
    admin = admin_part(request)
    owner = await asyncio.to_thread(owned_by, admin, caller, name)
    sha = await asyncio.to_thread(_sha, admin, name, version)
    await asyncio.to_thread(admin.registry.delete_version, name, version)
    await admin.serve_now(name, deleted=[f"{name}@{version}"])
    await audit_change(request, caller, "delete_version", name, version, sha, tenant=owner)
    return {"name": name, "version": version, "deleted": True}


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, request: Request, reason: str | None = Reason,
                         caller: Caller = Depends(admin_caller)) -> dict:
    admin = admin_part(request)
    owner = await asyncio.to_thread(owned_by, admin, caller, name)
    versions = await asyncio.to_thread(admin.registry.delete, name)
    await admin.serve_now(name, deleted=[f"{name}@{v}" for v in versions])
    await audit_change(request, caller, "delete", name, tenant=owner, versions=versions)
    return {"name": name, "versions": versions, "deleted": True}


@router.get("/usage")
async def usage(request: Request, tenant: str | None = Query(None, description="Required of operators."),
                since: str | None = Query(None, description="ISO 8601 time or an age such as 30m or 7d; default: "
                                                            "all time."),
                until: str | None = Query(None, description="ISO 8601 time or an age; default: now."),
                caller: Caller = Depends(admin_caller)) -> dict:
    """A tenant's completed requests and tokens in a window (whole minutes); a tenant-admin sees its own only."""
    tenant = acting_tenant(caller, tenant, "a tenant-admin key sees its own tenant's usage only", "required")
    window = []
    for param, text, default in (("since", since, 0.0), ("until", until, time.time())):
        try:
            window.append(parse_since(text) if text else default)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
    return await admin_part(request).usage.totals(check_name(tenant, "tenant"), *window)
