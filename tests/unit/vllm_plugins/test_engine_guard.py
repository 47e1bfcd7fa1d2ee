"""Every route of a loraplex engine, read off vLLM's own app as the engine builds it, called with and without the
engine key (issue 25, item 1)."""

import re

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount

from server.core.config import Settings
from server.engine.process import engine_command
from server.vllm_plugins.engine_guard import OPEN, REFUSED

KEY = "engine-key-for-tests"
GUARDS = "adapters are loaded only by loraplex's resolver"  # the guard's own refusal, told from vLLM's answers


@pytest.fixture(scope="module")
def engine_app():
    """vLLM's API server app with the arguments loraplex starts engines with (no model loaded: no lifespan runs)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_API_KEY", KEY)
    mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(engine_command(Settings(), "/m", 9000)[3:])
    yield build_app(args, supported_tasks=("generate",))
    mp.undo()


def routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled in."""
    found = []
    for route in app.routes:
        if isinstance(route, Mount):
            continue
        path = re.sub(r"{[^}]+}", "x", route.path)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            found.append((method, path))
    return found


def test_the_app_serves_the_routes_the_review_found_open(engine_app):
    paths = {path for _, path in routes(engine_app)}
    assert {"/invocations", "/adapters", "/metrics", "/tokenize", "/openapi.json", "/version", "/health",
            "/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= paths, sorted(paths)


def test_nothing_answers_without_the_engine_key_but_liveness(engine_app):
    client = TestClient(engine_app, raise_server_exceptions=False)
    answered = []
    for method, path in routes(engine_app):
        if path in OPEN and method in ("GET", "HEAD"):
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = client.request(method, path, headers=headers)
            if r.status_code != 401:
                answered.append((method, path, headers, r.status_code))
    assert answered == []


def test_with_the_key_everything_but_loading_by_path_reaches_vllm(engine_app):
    client = TestClient(engine_app, raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = {(m, p) for m, p in routes(engine_app) if GUARDS in client.request(m, p, headers=auth).text}
    assert refused == {(m, p) for m, p in routes(engine_app) if p.startswith(REFUSED)}
    assert ("POST", "/v1/unload_lora_adapter") not in refused and ("POST", "/adapters") in refused
    assert ("POST", "/invocations") in refused and ("POST", "/v1/load_lora_adapter") in refused
