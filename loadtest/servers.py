"""Starts and stops a loraplex gateway (with its engine) for tests, load scripts and benchmarks, in a process group
of its own; and the one readiness wait they all use."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from server.engine_process import free_port

LOADER = str(Path(sys.executable).parent / "loraplex")


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float,
               seen: list[tuple[int, int]] | None = None) -> None:
    """Polls /ready until it answers 200; raises if the process exits or `timeout` passes. Each poll's
    (/health, /ready) status pair goes to `seen` when given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with code {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            health = httpx.get(f"{url}/health", timeout=5).status_code if seen is not None else 200
            ready = httpx.get(f"{url}/ready", timeout=5).status_code
        except httpx.TransportError:
            ready = None
        else:
            if seen is not None:
                seen.append((health, ready))
        if ready == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url}: not ready after {timeout:.0f} s: {log.read_text()[-3000:]}")


class Gateway:
    """`loraplex serve` with the given settings; `url`, `pid`, and the RSS of it and of its engine."""

    def __init__(self, env: dict[str, str], log: Path, timeout: float = 600):
        self.port = int(env.get("LORAPLEX_PORT") or free_port())
        self.env = {**os.environ, **env, "LORAPLEX_PORT": str(self.port)}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.startup: list[tuple[int, int]] = []  # (/health, /ready) while it started
        with open(log, "w") as out:
            self.proc = subprocess.Popen([LOADER, "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_ready(self.url, self.proc, log, timeout, self.startup)
        except RuntimeError:
            self.stop()
            raise

    def api_server(self) -> psutil.Process:
        """vLLM's OpenAI API server process of the engine this gateway spawned (its front end, not EngineCore)."""
        for child in psutil.Process(self.proc.pid).children():
            if "vllm.entrypoints.openai.api_server" in child.cmdline():
                return child
        raise RuntimeError("no spawned engine found")

    def engine_url(self) -> str:
        """The URL of the engine this gateway spawned, read off the engine's command line."""
        cmd = self.api_server().cmdline()
        return f"{'https' if '--ssl-certfile' in cmd else 'http'}://127.0.0.1:{cmd[cmd.index('--port') + 1]}"

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of the gateway process and, summed, of everything it started (the engine)."""
        gateway = psutil.Process(self.proc.pid)
        engine = 0
        for child in gateway.children(recursive=True):
            try:
                engine += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return {"gateway": gateway.memory_info().rss / 2**20, "engine": engine / 2**20}

    def stop(self) -> None:
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for p in family:  # the engine runs in a process group of its own; anything of it still left
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
