"""Chooses the engine for a request: one that already holds the adapter, else the least busy."""

import time
from dataclasses import dataclass

from .engine_client import EngineClient
from .engine_process import EngineProcess
from .residency import Residency


@dataclass(eq=False)  # compared by identity
class Backend:
    engine: EngineClient
    residency: Residency
    process: EngineProcess | None = None  # set when the gateway spawned this engine
    up: bool = False
    in_flight: int = 0
    failed_at: float = float("-inf")  # when a request to it last failed

    def failed(self) -> None:
        """A request failed on the engine (a 5xx): it comes last in the choice for a while."""
        self.failed_at = time.monotonic()

    def unreachable(self) -> None:
        """A request could not reach the engine: out of rotation until its next good health probe."""
        self.up = False
        self.failed()

    def failing(self, now: float, window: float = 5.0) -> bool:
        return now - self.failed_at < window


class Router:
    def __init__(self, backends: list[Backend]):
        self.backends = backends

    def choose(self, key: str | None, exclude: tuple[Backend, ...] = ()) -> Backend | None:
        """Among engines that are up: those where `key` is resident (no load needed), then the least busy.

        An engine that failed a request lately comes last: its requests end at once, so its in-flight count
        stays low and would otherwise draw all the traffic."""
        up = [b for b in self.backends if b.up and b not in exclude]
        if not up:
            return None
        now = time.monotonic()
        candidates = [b for b in up if key is not None and key in b.residency] or up
        return min(candidates, key=lambda b: (b.failing(now), b.in_flight))
