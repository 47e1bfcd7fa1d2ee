"""The FastAPI app: composes the gateway's parts and routes from Settings, starts and stops engines with it."""

import asyncio
import logging
import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.gateway import admin_routes as admin_api
from server.core import base_model as basemodel
from server.gateway import openai_routes as openai_api
from server.gateway import ops_routes as ops_api
from server.tenancy.admission import Admission
from server.observability.audit import AuditLog
from server.tenancy.keys import Credentials, admin_token, engine_key, key_store
from server.core.config import Settings
from server.engine.discovery import Discovery
from server.store.documents import shared_document
from server.engine.client import EngineClient
from server.engine.process import EngineProcess
from server.gateway.parts import Gateway
from server.gateway.body_limit import BodyLimit
from server.observability.metrics import Metrics
from server.core.protocol import ERROR_RESPONSES, APIError, error_response
from server.registry.directory import RegistryError, open_registry
from server.observability.request_ids import RequestIds
from server.engine.routing import Backend, Router
from server.rollout.rollouts import ROLLOUTS_FILE, Rollouts
from server.rollout.shadow import Shadows
from server.engine.supervisor import Supervisor
from server.observability.tracing import tracer
from server.tenancy.usage import usage_ledger

log = logging.getLogger("loraplex")


def _param(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def create_admin_app(settings: Settings, main: FastAPI) -> FastAPI:
    """/admin alone, for its own port or interface (ADMIN_PORT); it shares the main app's gateway."""
    admin = FastAPI(title="loraplex admin", responses=ERROR_RESPONSES)
    admin.include_router(admin_api.router)
    admin.include_router(ops_api.router)
    admin.state = main.state
    _install_errors(admin, settings)
    admin.add_middleware(Credentials, guard_admin=True)  # before the body limit reads anything
    admin.add_middleware(RequestIds)
    return admin


def _install_errors(app: FastAPI, settings: Settings) -> None:
    """Every error, ours or the framework's, leaves as an OpenAI error body; bodies over their limit get 413."""
    app.add_middleware(BodyLimit, default=settings.max_request_bytes,
                       per_path={"/admin/adapters": settings.max_upload_bytes})

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return admin_api.registry_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            return error_response(400, f"request body is not valid JSON: {reason}".rstrip(": "), code="invalid_json")
        param = _param(first.get("loc", ()))
        return error_response(400, f"{param}: {first.get('msg')}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind)


def _gateway(settings: Settings, base: basemodel.BaseModel) -> Gateway:
    # Idle connections close before vLLM's 5 s keep-alive does, so a POST never goes out on a closing one.
    # Engines on https:// URLs are verified against ENGINE_CA when set, else the system's CAs.
    tls = ssl.create_default_context(cafile=settings.engine_ca) if settings.engine_ca else True
    # No cookie jar: engines set none, and one set for one caller must never go out with another caller's request.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0, ssl=tls),
                                    cookie_jar=aiohttp.DummyCookieJar())
    metrics = Metrics(settings.metrics_max_adapters, settings.metrics_max_tenants)
    admin = admin_token(settings)
    key = engine_key(settings, admin)
    remote = settings.engine_urls or settings.engine_dns
    spawned = [] if remote else [EngineProcess(settings, str(base.path), key)]
    engines = [(EngineClient(p.url, session, settings.request_timeout, key), p) for p in spawned] or [
        (EngineClient(url, session, settings.request_timeout, key), None) for url in settings.engine_urls]
    backends = [Backend(e, p, label=str(i)) for i, (e, p) in enumerate(engines)]  # none yet when found by DNS
    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    # Reads come from the snapshot that Gateway.follow_registry renews, never from the store on the request path.
    registry = open_registry(settings.registry, max_age=math.inf)
    audit, router = AuditLog(settings.state_dir, settings.registry), Router(backends)
    rollouts = Rollouts(shared_document(settings.registry, settings.state_dir, ROLLOUTS_FILE), registry, audit)
    shadows = Shadows(router, metrics, settings.shadow_max_in_flight, settings.max_in_flight_per_engine // 2,
                      settings.max_response_bytes)
    return Gateway(settings, registry, base, session, router, key_store(settings, follow=True), audit,
                   metrics, Admission(settings.max_in_flight_per_engine, settings.max_in_flight_per_tenant,
                                      settings.retry_after),
                   usage_ledger(settings.registry, settings.state_dir, settings.tenant_budgets),
                   tracer(settings.otlp_endpoint), rollouts, shadows, admin, metrics_token,
                   asyncio.Semaphore(settings.archive_workers))


def _discovery(gw: Gateway) -> Discovery:
    """Engines behind ENGINE_DNS, each labelled in metrics by its address."""
    s = gw.settings

    def backend(url: str) -> Backend:
        return Backend(EngineClient(url, gw.session, s.request_timeout, engine_key(s, gw.admin_token)),
                       label=urlsplit(url).netloc)

    return Discovery(s.engine_dns, gw.router, backend, s.engine_dns_interval)


def _background(gw: Gateway, known: dict[str, list[int]]) -> list[asyncio.Task]:
    """The gateway's background work: supervising engines, following the registry, finding engines by DNS."""
    jobs = [Supervisor(gw.router.backends, gw.metrics, gw.settings.engine_start_timeout).run(),
            gw.follow_registry(known)]
    if gw.settings.engine_dns:
        jobs.append(_discovery(gw).run())
    tasks = [asyncio.create_task(job) for job in jobs]
    for task in tasks:
        task.add_done_callback(_log_unexpected_end)
    return tasks


def _log_unexpected_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a background task of the gateway stopped", exc_info=task.exception())


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = await asyncio.to_thread(basemodel.load, settings.base_model)
        gw = app.state.gateway = _gateway(settings, base)
        if gw.keys.enabled():
            log.info("auth: API keys required on /v1 (LORAPLEX_AUTH=%s)", settings.auth)
        else:
            log.warning("auth: open, /v1 is open to every caller (LORAPLEX_AUTH=%s; create a key with "
                        "`loraplex keys create`, after which it stays closed)", settings.auth)
        spawned = [b.process for b in gw.router.backends if b.process]
        for proc in spawned:
            proc.start()
        tasks = _background(gw, await asyncio.to_thread(gw.registry.refresh))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await gw.session.close()
            for proc in spawned:
                await asyncio.to_thread(proc.stop)
            if gw.tracer:
                await asyncio.to_thread(gw.tracer.shutdown)

    app = FastAPI(title="loraplex", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.include_router(openai_api.router)
    app.include_router(ops_api.router)
    if settings.admin_port is None:
        app.include_router(admin_api.router)
    _install_errors(app, settings)
    app.add_middleware(Credentials, guard_admin=settings.admin_port is None)
    if settings.cors_origins:
        # Outside the credentials check: a browser's preflight carries no credentials, and a refusal must still
        # carry the CORS headers for the page to read it. The methods are those /admin uses.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestIds)  # outermost: every answer carries the id
    return app
