"""The image and the compose file, built and run for real (`make test-container` builds loraplex:latest on a Debian
base image made by debootstrap first). Containers use the host's network, so their traffic stays on loopback."""

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loadtest.adapters import ALL_LINEAR, AdapterFactory
from server.engine.process import free_port
from tests.helpers.archives import archive
from tests.helpers.calls import upload
from tests.helpers.polling import wait_until

IMAGE = "loraplex:latest"
TOKEN = "container-test-admin-token"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
READY_TIMEOUT = 300.0


def docker(*args: str, check: bool = True) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True)
    assert not check or r.returncode == 0, f"docker {' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    return r.stdout.strip()


def logs(name: str) -> str:
    """A container's output, both streams (docker logs splits them as the container wrote them)."""
    r = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
    return r.stdout + r.stderr


def inspect(name: str, template: str) -> str:
    return docker("inspect", "-f", template, name)


@dataclass
class Container:
    name: str
    url: str
    ready_s: float

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_gateway(name: str) -> Container:
    """`docker run` of the image as a user would, on a free port; returns once /ready answers 200."""
    port = free_port()
    started = time.monotonic()
    # vLLM's engine and workers talk through /dev/shm, which needs more than Docker's default 64 MiB.
    docker("run", "-d", "--name", name, "--network", "host", "--shm-size", "1g", "-e", f"LORAPLEX_PORT={port}",
           "-e", f"LORAPLEX_ADMIN_TOKEN={TOKEN}", IMAGE)
    url = f"http://127.0.0.1:{port}"

    def ready_or_exited() -> bool:
        return _answers(f"{url}/ready") or inspect(name, "{{.State.Running}}") != "true"

    assert wait_until(ready_or_exited, READY_TIMEOUT), logs(name)[-3000:]
    assert _answers(f"{url}/ready"), logs(name)[-3000:]
    return Container(name, url, time.monotonic() - started)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Container]:
    name = f"loraplex-test-{os.getpid()}"
    container = run_gateway(name)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE))
    print(f"\nimage {IMAGE}: {size / 2**30:.2f} GiB; docker run to /ready: {container.ready_s:.1f} s")
    yield container
    docker("rm", "-f", "-v", name, check=False)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, gateway) -> bytes:
    """A rank-8 adapter for the image's own demo model, whose config is copied out of the container."""
    tmp = tmp_path_factory.mktemp("container")
    docker("cp", f"{gateway.name}:/opt/models/demo-base", str(tmp / "demo-base"))
    return archive(AdapterFactory(tmp / "demo-base", 8, ALL_LINEAR).write(tmp / "adapter", seed=7))


def test_runs_as_non_root_and_turns_healthy(gateway):
    users = docker("top", gateway.name, "-eo", "pid,uid,args").splitlines()[1:]
    assert users and all(line.split()[1] != "0" for line in users), users
    assert any("vllm.entrypoints.openai.api_server" in line for line in users), "the engine runs in the container"
    assert wait_until(lambda: inspect(gateway.name, "{{.State.Health.Status}}") == "healthy", 60), \
        inspect(gateway.name, "{{json .State.Health}}")


def test_upload_and_answer_through_the_container(gateway, adapter):
    with gateway.admin() as admin:
        r = upload(admin, "support", adapter)
        assert r.status_code == 201, r.text
        version = r.json()["version"]
        answer = admin.post("/v1/completions", json={"model": "demo-base", "adapter": "support", "prompt": "Ada and",
                                                     "max_tokens": 8, "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == f"support@{version}" and answer.json()["usage"]["completion_tokens"] == 8
    stored = docker("exec", gateway.name, "ls", f"/data/adapters/support/{version}")
    assert "manifest.json" in stored.split(), "the registry is on the /data/adapters volume"


def test_sigterm_lets_a_running_stream_finish(gateway):
    name = f"{gateway.name}-sigterm"
    container = run_gateway(name)
    # Eight sequences of 1,000 tokens in one stream (the demo model's context ends at 1,024): one such sequence (about
    # 2.5 s) once ended in a loaded CI run before the gateway acted on the signal.
    body = {"model": "demo-base", "prompt": "Ada and", "max_tokens": 1000, "n": 8, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events, usage, signalled = 0, None, 0.0
    try:
        with container.admin() as client, client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                events += 1
                usage = chunk.get("usage") or usage
                if events == 1:  # SIGTERM (what `docker stop` sends) with most of the stream still to come
                    docker("kill", "--signal", "TERM", name)
                    signalled = time.monotonic()
                    # Not read further until the gateway has acted on the signal: the unread rest of the stream
                    # holds the connection open, so it is still running then, however fast the engine is.
                    assert wait_until(lambda: "Waiting for connections to close" in logs(name), 120), \
                        logs(name)[-3000:]
        print(f"stream ran {time.monotonic() - signalled:.1f} s after the SIGTERM")
        code = docker("wait", name)
        assert usage and usage["completion_tokens"] == 8000, usage
        assert "Waiting for connections to close" in logs(name), "the SIGTERM came while the stream ran"
        # uvicorn re-raises SIGTERM once its graceful shutdown is done, so the end is 143 (the signal); a SIGKILL
        # (docker stop's, after its timeout) would be 137.
        assert code in ("0", "143"), logs(name)[-3000:]
    finally:
        docker("rm", "-f", "-v", name, check=False)


def _targets(url: str) -> dict[str, str]:
    try:
        active = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    return {t["labels"]["job"]: t["health"] for t in active}


def test_compose_brings_up_the_gateway_with_prometheus(tmp_path):
    busy = [port for port in (8000, 9090) if _answers(f"http://127.0.0.1:{port}/")]
    assert not busy, f"compose.yaml's services listen on the host's ports 8000 and 9090; in use: {busy}"
    token = tmp_path / "metrics_token"
    token.write_text("container-test-metrics-token")
    env = {**os.environ, "LORAPLEX_ADMIN_TOKEN": TOKEN, "LORAPLEX_METRICS_TOKEN": token.read_text(),
           "LORAPLEX_METRICS_TOKEN_FILE": str(token)}
    compose = ["docker-compose", "-f", str(DEPLOY / "compose.yaml"), "-p", f"loraplex-test-{os.getpid()}"]
    try:
        up = subprocess.run([*compose, "up", "-d", "gateway", "prometheus"], env=env, capture_output=True, text=True)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert wait_until(lambda: _targets("http://127.0.0.1:9090") == {"loraplex": "up", "vllm": "up"},
                          READY_TIMEOUT), _targets("http://127.0.0.1:9090")
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, capture_output=True)
