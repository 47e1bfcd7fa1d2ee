"""Shared test helpers: an in-memory engine, the real gateway app in process, and the requests and polls the
end-to-end tests share. The stand-in engine over real HTTP is loadtest.stub_engine.StubEngine."""

import asyncio
import io
import json
import tarfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml

from server.gateway.app import create_app
from server.core.config import Settings

if TYPE_CHECKING:
    from tests.e2e.conftest import Output


class FakeEngine:
    """An engine's adapter API in memory: the versions it holds, and the unloads it was asked for."""

    def __init__(self, url: str = "http://engine", held: set[str] = frozenset()):
        self.url, self.held = url, set(held)
        self.unloaded: list[str] = []

    async def adapters(self) -> set[str]:
        return set(self.held)

    async def unload_lora(self, name: str) -> None:
        self.unloaded.append(name)
        self.held.discard(name)


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Polls an async or plain predicate until it holds or `timeout` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(interval)
    return False


@asynccontextmanager
async def gateway_over(engine_urls: list[str], base_model: str, tmp_path, **settings):
    """The real gateway app, lifespan and supervisor included, over the given engines; yields an HTTP client."""
    app = create_app(Settings(base_model=base_model, registry=tmp_path / "registry", state_dir=tmp_path / "state",
                              engine_urls=engine_urls, admin_token="admin-token", **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
            client.app = app
            yield client


async def ready(client: httpx.AsyncClient, engines: int = 1) -> bool:
    r = await client.get("/ready")
    return r.status_code == 200 and sum(r.json()["engines"]) >= engines


# Requests and polls shared by the end-to-end tests.
PROMPTS = ["Ada and", "Today Chen", "The printer"]
CHATS = [
    [{"role": "user", "content": "How do I reset my password?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my order?"}],
]
MAX_TOKENS = 16


def complete(client: httpx.Client, prompt: str | list, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    """A greedy completion with its token ids; asserts a 200."""
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                             "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: httpx.Client, messages: list[dict], max_tokens: int = MAX_TOKENS, **extra) -> dict:
    """A greedy chat completion with its token ids; asserts a 200."""
    r = client.post("/v1/chat/completions",
                    json={"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                          "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def same(choice: dict, expected: "Output") -> bool:
    """Whether an answer's choice is the reference output, token for token."""
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return expected.matches(choice["token_ids"], text)


def streamed_text(client: httpx.Client, path: str, body: dict) -> str:
    """The text of a streamed answer; asserts it is server-sent events ending with [DONE]."""
    parts, done = [], False
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    assert done, "stream did not end with data: [DONE]"
    return "".join(parts)


def archive(src: Path, extra: dict[str, bytes] | None = None, skip: tuple = ()) -> bytes:
    """An adapter directory as a .tar.gz upload, with `extra` members added and the files in `skip` left out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            if f not in skip:
                tar.add(src / f, arcname=f)
        for name, content in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def upload(admin: httpx.Client, name: str, data: bytes, tenant: str = "acme", **fields: str) -> httpx.Response:
    """POST /admin/adapters of an archive."""
    return admin.post("/admin/adapters", data={"name": name, "tenant": tenant, **fields},
                      files={"file": (f"{name}.tar.gz", data)})


def series(text: str, name: str, **labels: str) -> list[float]:
    """Values of a Prometheus series with these labels, in the text format."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    """Polls `predicate` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() < deadline
        time.sleep(0.1)
    return False


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key, as PEM files in `directory`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraplex test engine")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "engine.crt", directory / "engine.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on a thread of its own: keeps every span it is sent, attributes as a dict."""

    def __init__(self):
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans = self.spans = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                export = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["content-length"])))
                for resource in export.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            values = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                            spans.append({"name": span.name, "trace_id": span.trace_id.hex(), "service": service,
                                          "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                          **values})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


DEMO_DATA = Path(__file__).parents[1] / "examples" / "demo-support"


def write_job(tmp_path: Path, base_model: Path, name: str, **overrides) -> Path:
    """A short QLoRA job on the demo data (examples/demo-support), with any keys overridden."""
    job = {
        "base_model": str(base_model), "data": [str(DEMO_DATA / "support.jsonl")],
        "adapter": {"name": name, "tenant": "nimbus"}, "lora": {"r": 8, "alpha": 16},
        "quantization": "nf4", "max_steps": 30, "learning_rate": 1e-3, "batch_size": 8, "max_seq_len": 256,
        "eval_fraction": 0.15, "general_eval": str(DEMO_DATA / "general.txt"), "eval_generations": 2,
        "max_new_tokens": 8, "save_steps": 10, "output_dir": str(tmp_path / name), **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path
