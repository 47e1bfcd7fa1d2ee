"""The end-to-end session's gateway: its tokens, the command that starts it, and another gateway beside it."""

import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtest.servers import Gateway
from loadtest.servers import LOADER as LOADER_PATH
from server.core.config import Settings
from server.tenancy.keys import engine_key

ADMIN_TOKEN = "e2e-admin-token"
# /metrics needs the admin or metrics token.
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The engines demand the key their gateways derive from the admin token.
ENGINE_AUTH = {"Authorization": f"Bearer {engine_key(Settings(), ADMIN_TOKEN)}"}
# The console script `make serve` runs.
LOADER = [LOADER_PATH]


@dataclass
class Server:
    """The session's gateway (loadtest.servers.Gateway, the one way tests and benchmarks start one) and its inputs."""

    gateway: Gateway
    adapter_dirs: dict[str, Path]

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def env(self) -> dict:
        return self.gateway.env

    @property
    def log(self) -> Path:
        return self.gateway.log

    @property
    def startup(self) -> list[tuple[int, int]]:
        return self.gateway.startup

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*LOADER, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def engine_url(self) -> str:
        return self.gateway.engine_url()


def start_gateway(server: Server, tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """Another gateway in front of the session's engine, with its own state dir and any settings given."""
    env = {**server.env, "LORAPLEX_PORT": "", "LORAPLEX_ENGINE_URLS": server.engine_url(),
           "LORAPLEX_STATE_DIR": str(tmp_path / "state"), **env}
    gateway = Gateway(env, tmp_path / "gateway.log", timeout=120)
    return gateway.proc, gateway.url
