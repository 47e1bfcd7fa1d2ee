"""The FastAPI app: builds the gateway's parts from Settings, starts their background work and the engines with it."""

import asyncio
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aiohttp
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import State

from server.core import base_model
from server.core.durations import duration
from server.core.config import Settings
from server.core.errors import ERROR_RESPONSES
from server.data import open_store
from server.data.policy import POLICIES_FILE, Policies
from server.data.retention import Retention
from server.data.writer import RecordWriter
from server.engine.client import EngineClient
from server.engine.discovery import Discovery
from server.engine.process import EngineProcess
from server.engine.retirement import Retirement
from server.engine.routing import Backend, Router
from server.engine.supervisor import Supervisor
from server.gateway import admin_routes, data_routes, openai_routes, ops_routes, stored_routes, weights_routes
from server.gateway.admin_routes import Admin
from server.gateway.auth import Access, Credentials
from server.gateway.capture import Capture
from server.gateway.compositions import Compositions
from server.gateway.body_limit import BodyLimit
from server.gateway.errors import install_error_handlers
from server.gateway.evaluations import Evaluator
from server.gateway.serving import Serving
from server.observability.audit import AuditLog
from server.observability.metrics import Metrics
from server.observability.request_ids import RequestIds
from server.observability.tracing import tracer
from server.registry import open_registry
from server.registry.view import RegistryView
from server.rollout.rollouts import ROLLOUTS_FILE, Rollouts
from server.rollout.shadow import Shadows
from server.store.documents import shared_document
from server.store.lease import LEASES_FILE, Lease
from server.store.streams import stream_id
from server.tenancy.admission import Admission
from server.tenancy.keys import admin_token, engine_key, key_store
from server.tenancy.usage import usage_ledger

log = logging.getLogger("loraplex")


def create_admin_app(settings: Settings, main: FastAPI) -> FastAPI:
    """/admin alone, for its own port or interface (ADMIN_PORT); it shares the main app's parts."""
    admin = FastAPI(title="loraplex admin", responses=ERROR_RESPONSES)
    admin.include_router(admin_routes.router)
    admin.include_router(weights_routes.router)
    admin.include_router(data_routes.router)
    admin.include_router(ops_routes.router)
    admin.state = main.state
    _install_errors(admin, settings)
    admin.add_middleware(Credentials, guard_admin=True)  # before the body limit reads anything
    admin.add_middleware(RequestIds)
    return admin


def _install_errors(app: FastAPI, settings: Settings) -> None:
    """Every error, ours or the framework's, leaves as an OpenAI error body; bodies over their limit get 413."""
    app.add_middleware(BodyLimit, default=settings.max_request_bytes,
                       per_path={"/admin/adapters": settings.max_upload_bytes})
    install_error_handlers(app)


def _session(settings: Settings) -> aiohttp.ClientSession:
    """The one connection pool to every engine."""
    # Idle connections close before vLLM's 5 s keep-alive does, so a POST never goes out on a closing one.
    # Engines on https:// URLs are verified against ENGINE_CA when set, else the system's CAs.
    tls = ssl.create_default_context(cafile=settings.engine_ca) if settings.engine_ca else True
    # No cookie jar: engines set none, and one set for one caller must never go out with another caller's request.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0, ssl=tls),
                                 cookie_jar=aiohttp.DummyCookieJar())


def _backends(settings: Settings, base: base_model.BaseModelInfo, session: aiohttp.ClientSession,
              key: str) -> list[Backend]:
    """A spawned engine, or the engines at ENGINE_URLS; none yet when they are found by DNS."""
    remote = settings.engine_urls or settings.engine_dns
    spawned = [] if remote else [EngineProcess(settings, str(base.path), key)]
    engines = [(EngineClient(p.url, session, settings.request_timeout, key), p) for p in spawned] or [
        (EngineClient(url, session, settings.request_timeout, key), None) for url in settings.engine_urls]
    return [Backend(e, p, label=str(i)) for i, (e, p) in enumerate(engines)]


def _assemble(state: State, settings: Settings, base: base_model.BaseModelInfo) -> None:
    """Builds each part from what it needs, by name, onto the app's state."""
    state.settings, state.started, state.session = settings, time.time(), _session(settings)
    admin = admin_token(settings)
    state.router = Router(_backends(settings, base, state.session, engine_key(settings, admin)))
    state.metrics = Metrics(settings.metrics_max_adapters, settings.metrics_max_tenants)
    # The request path reads the view, renewed in the background; the store only for what the view has not seen.
    state.registry = open_registry(settings.registry, max_age=math.inf)
    retire = Retirement(state.router)
    state.view = RegistryView(state.registry, settings.registry_poll, on_deleted=retire)
    audit = AuditLog(settings.state_dir, settings.registry)
    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    state.access = Access(keys=key_store(settings, follow=True), admin_token=admin, metrics_token=metrics_token,
                          audit=audit)
    state.usage = usage_ledger(settings.registry, settings.state_dir, settings.tenant_budgets)
    admission = Admission(settings.max_in_flight_per_engine, settings.max_in_flight_per_tenant, settings.retry_after)
    state.data = open_store(settings.registry, settings.state_dir)
    state.rollouts = Rollouts(shared_document(settings.registry, settings.state_dir, ROLLOUTS_FILE), state.registry,
                              audit, changed=state.view.changed,
                              feedback=lambda since: [f for tenant in state.data.tenants()
                                                      for f in state.data.feedback(tenant, since=since)])
    shadows = Shadows(state.router, state.metrics, settings.shadow_max_in_flight,
                      settings.max_in_flight_per_engine // 2, settings.max_response_bytes)
    state.policies = Policies(shared_document(settings.registry, settings.state_dir, POLICIES_FILE))
    state.writer = RecordWriter(state.data, settings.capture_queue, state.metrics.stored_dropped.inc)
    leases = shared_document(settings.registry, settings.state_dir, LEASES_FILE)
    state.retention = Retention(store=state.data, policies=state.policies, audit=audit,
                                lease=Lease(leases, "retention", stream_id(), 2 * settings.retention_interval),
                                interval=settings.retention_interval, ledger_seconds=duration(settings.ledger_retention))
    state.serving = Serving(settings=settings, base=base, view=state.view, router=state.router, admission=admission,
                            usage=state.usage, metrics=state.metrics, tracer=tracer(settings.otlp_endpoint),
                            rollouts=state.rollouts, shadows=shadows,
                            compositions=Compositions(settings=settings, base=base, registry=state.registry,
                                                      view=state.view, audit=audit),
                            capture=Capture(policies=state.policies, writer=state.writer))
    evaluator = Evaluator(settings=settings, registry=state.registry, router=state.router, admission=admission,
                          usage=state.usage)
    state.admin = Admin(settings=settings, base=base, registry=state.registry, view=state.view, audit=audit,
                        rollouts=state.rollouts, usage=state.usage, evaluator=evaluator, retire=retire,
                        archive_slots=asyncio.Semaphore(settings.archive_workers), data=state.data)


def _discovery(state: State) -> Discovery:
    """Engines behind ENGINE_DNS, each labelled in metrics by its address."""
    s = state.settings
    key = engine_key(s, state.access.admin_token)

    def backend(url: str) -> Backend:
        return Backend(EngineClient(url, state.session, s.request_timeout, key), label=urlsplit(url).netloc)

    return Discovery(s.engine_dns, state.router, backend, s.engine_dns_interval)


def _background(state: State) -> list[asyncio.Task]:
    """Each part's own background work: supervising engines, keeping the registry view, keys, usage and rollouts
    current, finding engines by DNS."""
    poll = state.settings.registry_poll
    supervisor = Supervisor(state.router.backends, state.metrics, state.settings.engine_start_timeout)
    jobs: list[Coroutine] = [supervisor.run(), state.view.keep_current(), state.usage.keep_current(poll),
                             state.rollouts.keep_current(poll), state.policies.keep_current(poll),
                             state.retention.run()]
    if state.access.keys.follow:
        jobs.append(state.access.keys.keep_current(poll))
    if state.settings.engine_dns:
        jobs.append(_discovery(state).run())
    tasks = [asyncio.create_task(job) for job in jobs]
    for task in tasks:
        task.add_done_callback(_log_unexpected_end)
    return tasks


def _log_unexpected_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a background task of the gateway stopped", exc_info=task.exception())


@asynccontextmanager
async def _lifespan(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    base = await asyncio.to_thread(base_model.load, settings.base_model)
    state = app.state
    _assemble(state, settings, base)
    if state.access.keys.enabled():
        log.info("auth: API keys required on /v1 (LORAPLEX_AUTH=%s)", settings.auth)
    else:
        log.warning("auth: open, /v1 is open to every caller (LORAPLEX_AUTH=%s; create a key with "
                    "`loraplex keys create`, after which it stays closed)", settings.auth)
    spawned = [b.process for b in state.router.backends if b.process]
    for proc in spawned:
        proc.start()
    await asyncio.to_thread(state.view.refresh)
    tasks = _background(state)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await state.session.close()
        await asyncio.to_thread(state.writer.close)
        for proc in spawned:
            await asyncio.to_thread(proc.stop)
        if state.serving.tracer:
            await asyncio.to_thread(state.serving.tracer.shutdown)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="loraplex", lifespan=lambda app: _lifespan(app, settings), responses=ERROR_RESPONSES)
    app.include_router(openai_routes.router)
    app.include_router(stored_routes.router)
    app.include_router(ops_routes.router)
    if settings.admin_port is None:
        app.include_router(admin_routes.router)
        app.include_router(weights_routes.router)
        app.include_router(data_routes.router)
    _install_errors(app, settings)
    app.add_middleware(Credentials, guard_admin=settings.admin_port is None)
    if settings.cors_origins:
        # Outside the credentials check: a browser's preflight carries no credentials, and a refusal must still
        # carry the CORS headers for the page to read it. The methods are those /admin uses.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestIds)  # outermost: every answer carries the id
    return app
