"""Chooses the engine for a request: one that already holds the adapter, else the least busy."""

from dataclasses import dataclass

from .engine import EngineClient
from .residency import Residency


@dataclass
class Backend:
    engine: EngineClient
    residency: Residency
    in_flight: int = 0


class Router:
    def __init__(self, backends: list[Backend]):
        self.backends = backends

    def choose(self, key: str | None) -> Backend:
        """Prefers engines where `key` is resident (no load needed), then the fewest requests in flight."""
        candidates = [b for b in self.backends if key is not None and key in b.residency] or self.backends
        return min(candidates, key=lambda b: b.in_flight)
