"""Log lines stay one line each whatever a caller sends (issue 25, item 10)."""

import io
import logging

from fastapi.testclient import TestClient

from server.core.config import Settings
from server.gateway.app import create_app
from server.observability import logs


def test_a_percent_encoded_line_break_in_the_path_cannot_forge_an_access_log_line(tmp_path):
    logs.configure("INFO")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.getLogger().handlers[0].formatter)  # the formatter `loraplex serve` installs
    access = logging.getLogger("loraplex.access")
    access.addHandler(handler)
    try:
        forged = '/v1/x%0D%0A127.0.0.1 "GET /admin/adapters" 200 1.0 ms request_id=forged'
        TestClient(create_app(Settings(state_dir=tmp_path, registry=tmp_path / "r"))).get(forged)
    finally:
        access.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\\r\\n127.0.0.1" in lines[0], lines


def test_every_control_character_is_escaped():
    assert logs.escape("a\nb\rc\x1b[31m\x85\u2028d\te") == "a\\nb\\rc\\x1b[31m\\x85\\u2028d\\te"
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "adapter %s refused", ("evil\nFAKE line",), None)
    assert "\n" not in logs.OneLine(logs.FORMAT).format(record)
