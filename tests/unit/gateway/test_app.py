"""How the app is composed: CORS, and /admin on a port of its own."""

import pytest
from fastapi.testclient import TestClient

from server.core.config import Settings
from server.gateway.app import create_admin_app, create_app


def test_cors_is_off_by_default(client):
    r = client.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allows_only_configured_origins(tmp_path):
    app = create_app(Settings(state_dir=tmp_path, cors_origins="https://ok.example"))
    c = TestClient(app)
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = c.options("/v1/chat/completions", headers={"Origin": "https://ok.example", **preflight})
    assert ok.headers["access-control-allow-origin"] == "https://ok.example"
    bad = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in bad.headers


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_a_preflight_to_admin_from_an_allowed_origin_passes_for_every_admin_method(tmp_path, method):
    """A preflight carries no credentials: it must not meet the credentials check (it got 401, and PUT and DELETE
    were not allowed at all)."""
    c = TestClient(create_app(Settings(state_dir=tmp_path, cors_origins="https://ok.example", admin_token="t")))
    r = c.options("/admin/adapters/acme/aliases/stable", headers={
        "Origin": "https://ok.example", "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and method in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-origin"] == "https://ok.example"


def test_admin_port_moves_admin_off_the_main_app(tmp_path):
    settings = Settings(state_dir=tmp_path, admin_port=9001)
    main = create_app(settings)
    paths = {r.path for r in main.routes}
    assert not any(p.startswith("/admin") for p in paths)
    admin_paths = {r.path for r in create_admin_app(settings, main).routes}
    assert "/admin/adapters" in admin_paths and not any(p.startswith("/v1") for p in admin_paths)
    assert settings.server_url == "http://127.0.0.1:9001"


def test_admin_port_must_differ_from_port():
    with pytest.raises(ValueError, match="admin_port"):
        Settings(port=8000, admin_port=8000)

