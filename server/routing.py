"""Chooses the engine for a request: one that already holds the adapter, else the least busy."""

from dataclasses import dataclass

from .engine import EngineClient, EngineProcess
from .residency import Residency


@dataclass
class Backend:
    engine: EngineClient
    residency: Residency
    process: EngineProcess | None = None  # set when the gateway spawned this engine
    up: bool = False
    in_flight: int = 0


class Router:
    def __init__(self, backends: list[Backend]):
        self.backends = backends

    def choose(self, key: str | None) -> Backend | None:
        """Among engines that are up: those where `key` is resident (no load needed), then the least busy."""
        up = [b for b in self.backends if b.up]
        if not up:
            return None
        candidates = [b for b in up if key is not None and key in b.residency] or up
        return min(candidates, key=lambda b: b.in_flight)
