"""Tracing through to the engine: a gateway with LORAPLEX_OTLP_ENDPOINT spawns its vLLM engine with
--otlp-traces-endpoint, and vLLM's span for a request joins the gateway's trace at a local OTLP receiver."""

import httpx

from loadtest.servers import Gateway
from tests.helpers.otlp import OtlpReceiver
from tests.helpers.polling import wait_until


def test_the_engine_continues_the_gateways_trace(server, tmp_path):
    receiver = OtlpReceiver()
    env = {**server.env, "LORAPLEX_PORT": "", "LORAPLEX_STATE_DIR": str(tmp_path / "state"),
           "LORAPLEX_OTLP_ENDPOINT": receiver.url}
    gateway = Gateway(env, tmp_path / "gateway.log", timeout=300)
    try:
        r = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "Ada and", "max_tokens": 4}, timeout=60,
                       headers={"x-request-id": "traced-1"})
        assert r.status_code == 200, r.text

        def both() -> list[dict]:
            ours = [s for s in receiver.spans if s.get("loraplex.request_id") == "traced-1"]
            theirs = [s for s in receiver.spans if ours and s["service"] != "loraplex-gateway"
                      and s["trace_id"] == ours[0]["trace_id"]]
            return theirs and (ours[0], theirs[0])

        assert wait_until(both, 30), receiver.spans
        ours, theirs = both()
        assert theirs["parent"] == ours["span_id"], (ours, theirs)
    finally:
        gateway.stop()
        receiver.close()
