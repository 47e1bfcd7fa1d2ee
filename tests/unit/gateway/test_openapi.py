"""The API's shape: the OpenAPI schema of each app, compared with the one recorded in openapi.json (keys sorted).

A change to the API shows here as a diff to review; record a deliberate one by writing the new schema there."""

import json
from pathlib import Path

from server.core.config import Settings
from server.gateway.app import create_admin_app, create_app

RECORDED = Path(__file__).with_name("openapi.json")


def test_the_schema_is_the_recorded_one(tmp_path):
    together = Settings(state_dir=tmp_path, registry=tmp_path / "r")
    apart = Settings(state_dir=tmp_path, registry=tmp_path / "r", admin_port=9999)
    schemas = {"main": create_app(together).openapi(), "main without /admin": create_app(apart).openapi(),
               "admin": create_admin_app(apart, create_app(apart)).openapi()}
    assert json.loads(json.dumps(schemas, sort_keys=True)) == json.loads(RECORDED.read_text())
