"""The FastAPI app: builds the gateway's parts from Settings, starts and stops the engine with the app."""

import asyncio
import logging
import shutil
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from httpx_aiohttp import AiohttpTransport
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import admin_api, basemodel, openai_api
from .admission import Admission
from .audit import AuditLog
from .auth import KeyStore, admin_token
from .basemodel import BaseModel
from .config import Settings
from .engine import EngineClient, EngineProcess
from .limits import BodyLimit
from .metrics import Metrics
from .protocol import ERROR_RESPONSES, APIError, error_response
from .registry import Registry
from .residency import Residency
from .routing import Backend, Router
from .supervisor import Supervisor

log = logging.getLogger("loraplex")


@dataclass
class Gateway:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    registry: Registry
    base: BaseModel
    client: httpx.AsyncClient
    router: Router
    keys: KeyStore
    audit: AuditLog
    metrics: Metrics
    admission: Admission
    admin_token: str
    started: float = field(default_factory=time.time)
    _cleanups: set = field(default_factory=set)

    def retire(self, deleted: list[tuple[str, Path]]) -> None:
        """Unloads deleted versions from every engine once their requests finish, then removes their files."""
        async def cleanup():
            for key, trash in deleted:
                for backend in self.router.backends:
                    await backend.residency.retire(key)
                await asyncio.to_thread(shutil.rmtree, trash, True)

        task = asyncio.create_task(cleanup())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)


def _param(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def create_admin_app(settings: Settings, main: FastAPI) -> FastAPI:
    """/admin alone, for its own port or interface (ADMIN_PORT); it shares the main app's gateway."""
    admin = FastAPI(title="loraplex admin", responses=ERROR_RESPONSES)
    admin.include_router(admin_api.router)
    admin.state = main.state
    _install_errors(admin, settings)
    return admin


def _install_errors(app: FastAPI, settings: Settings) -> None:
    """Every error, ours or the framework's, leaves as an OpenAI error body; bodies over their limit get 413."""
    app.add_middleware(BodyLimit, default=settings.max_request_bytes,
                       per_path={"/admin/adapters": settings.max_upload_bytes})

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

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


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        base = await asyncio.to_thread(basemodel.load, settings.base_model)
        # httpx's API over aiohttp's C parser and pool: relaying a stream cost twice the CPU on httpcore and h11.
        # Idle connections close before vLLM's 5 s keep-alive does, so a POST never goes out on a closing one.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
        client = httpx.AsyncClient(transport=AiohttpTransport(client=aiohttp.ClientSession(connector=connector)),
                                   timeout=httpx.Timeout(settings.request_timeout, connect=5.0))
        metrics = Metrics(settings.metrics_max_adapters)
        spawned = [] if settings.engine_urls else [EngineProcess(settings, str(base.path))]
        engines = [(EngineClient(p.url, client), p) for p in spawned] or [
            (EngineClient(url, client), None) for url in settings.engine_urls]
        backends = [Backend(e, Residency(e, settings.max_resident_adapters, metrics), p) for e, p in engines]
        keys = KeyStore(settings.state_dir)
        gw = Gateway(settings, Registry(settings.registry), base, client, Router(backends), keys,
                     AuditLog(settings.state_dir), metrics,
                     Admission(settings.max_in_flight_per_engine, settings.max_in_flight_per_tenant,
                               settings.retry_after), admin_token(settings))
        app.state.gateway = gw
        if not keys.enabled():
            log.warning("no API keys configured: /v1 is open to every caller (create one with `loraplex keys create`)")
        for proc in spawned:
            proc.start()
        supervisor = asyncio.create_task(
            Supervisor(backends, metrics, settings.engine_start_timeout).run())
        try:
            yield
        finally:
            supervisor.cancel()
            await client.aclose()
            for proc in spawned:
                await asyncio.to_thread(proc.stop)

    app = FastAPI(title="loraplex", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.include_router(openai_api.router)
    if settings.admin_port is None:
        app.include_router(admin_api.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _install_errors(app, settings)

    prometheus_text = {200: {"content": {"text/plain": {}}}}

    @app.get("/metrics", responses=prometheus_text)
    async def metrics(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        for i, b in enumerate(gw.router.backends):
            gw.metrics.resident.labels(str(i)).set(len(b.residency))
            gw.metrics.engine_up.labels(str(i)).set(1 if b.up else 0)
        gw.metrics.registered.set(len(gw.registry.names()))
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/engine/{index}", responses=prometheus_text)
    async def engine_metrics(index: int, request: Request) -> Response:
        """The engine's own vLLM metrics (KV cache, queue), so one scrape target reaches spawned engines too."""
        gw: Gateway = request.app.state.gateway
        if not 0 <= index < len(gw.router.backends):
            raise APIError(404, f"no engine {index}", type="not_found_error", code="engine_not_found")
        engine = gw.router.backends[index].engine
        try:
            r = await engine.client.get(f"{engine.url}/metrics", timeout=10)
        except httpx.TransportError as e:
            raise APIError(503, f"engine unavailable: {type(e).__name__}", type="server_error",
                           code="engine_unavailable") from None
        return Response(r.content, status_code=r.status_code, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        gw: Gateway = request.app.state.gateway
        engines = [b.up for b in gw.router.backends]
        ok = any(engines)
        return JSONResponse({"ready": ok, "engines": engines}, status_code=200 if ok else 503)

    return app
