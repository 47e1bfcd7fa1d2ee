import json
import logging
import re

from loadtest.stub_engine import StubEngine
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.polling import wait_for

PROMPT = {"prompt": "x", "max_tokens": 1}


async def test_a_well_formed_caller_id_is_kept_and_the_engine_names_the_answer_after_the_gateways_id(
        base, tmp_path, caplog):
    engine = await StubEngine().start()
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: ready(client), 10)
        with caplog.at_level(logging.INFO, logger="loraplex.access"):
            r = await client.post("/v1/completions", json=PROMPT, headers={"x-request-id": "trace-42:a.b_c"})
            again = await client.post("/v1/completions", json=PROMPT, headers={"x-request-id": "trace-42:a.b_c"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42:a.b_c"
        answer_ids = [a.json()["id"].removeprefix("cmpl-") for a in (r, again)]
        assert engine.request_ids == answer_ids and len(set(answer_ids)) == 2, "unique, never the caller's"
        assert all(re.fullmatch(r"[0-9a-f]{31}", a) for a in answer_ids)
        assert any('"POST /v1/completions" 200' in m and m.endswith(f"request_id=trace-42:a.b_c answer_id={a}")
                   for m in caplog.messages for a in answer_ids[:1])
    await engine.stop()


async def test_a_missing_or_malformed_id_is_replaced_and_every_answer_carries_one(base, tmp_path):
    engine = await StubEngine().start()
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: ready(client), 10)
        for given in (None, "has space", "x" * 129, "semi;colon", ""):
            headers = {} if given is None else {"x-request-id": given}
            r = await client.post("/v1/completions", json=PROMPT, headers=headers)
            assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32 and r.headers["x-request-id"] != given
            assert r.json()["id"] == f"cmpl-{engine.request_ids[-1]}" != f"cmpl-{r.headers['x-request-id']}"
        for method, path in (("GET", "/health"), ("GET", "/metrics"), ("POST", "/admin/adapters")):
            r = await client.request(method, path, headers={"x-request-id": "refused-1"})
            assert r.headers["x-request-id"] == "refused-1", (path, r.status_code)  # refusals by middleware too
    await engine.stop()


async def test_the_id_stays_out_of_error_bodies_and_goes_into_audit_lines(base, tmp_path):
    engine = await StubEngine().start()
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: ready(client), 10)
        plain = await client.post("/v1/completions", json={**PROMPT, "adapter": "ghost"})
        traced = await client.post("/v1/completions", json={**PROMPT, "adapter": "ghost"},
                                   headers={"x-request-id": "trace-404"})
        assert traced.status_code == plain.status_code == 404 and traced.content == plain.content
        r = await client.delete("/admin/adapters/ghost", headers={"Authorization": "Bearer admin-token",
                                                                  "x-request-id": "trace-admin"})
        assert r.status_code == 404
        lines = [json.loads(line) for line in (tmp_path / "state" / "audit.log").read_text().splitlines()]
        assert lines[-1]["request_id"] == "trace-admin" and lines[-1]["result"].startswith("refused: 404")
    await engine.stop()
