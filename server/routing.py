"""Chooses the engine for a request: adapter affinity by rendezvous hashing with bounded load.

Every adapter version ranks the engines by a hash of (version, engine URL), the same on every gateway without
talking to each other. A request goes to the first engine in its ranking whose load is under `load_factor` times
the mean, so a version keeps to one engine (its adapter stays loaded there) until its traffic outgrows it and spills
to the next in its ranking; an engine joining or leaving moves only the versions it ranks first for.
"""

import hashlib
import time
from dataclasses import dataclass

from .engine_client import EngineClient
from .engine_process import EngineProcess


@dataclass(eq=False)  # compared by identity
class Backend:
    engine: EngineClient
    process: EngineProcess | None = None  # set when the gateway spawned this engine
    label: str = "0"  # its metrics label
    up: bool = False
    adapters: frozenset[str] = frozenset()  # versions it held at its last probe
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


def rank(key: str, url: str) -> int:
    """The engine's rendezvous score for `key`: a stable hash, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


def bounded(in_flight: int, total: int, engines: int, load_factor: float) -> bool:
    """Whether an engine with `in_flight` requests may take one more: under load_factor x the mean, counting it."""
    return in_flight + 1 <= max(1.0, load_factor * (total + 1) / engines)


class Router:
    def __init__(self, backends: list[Backend], load_factor: float = 1.25):
        self.backends = backends
        self.load_factor = load_factor

    def choose(self, key: str | None, exclude: tuple[Backend, ...] = ()) -> Backend | None:
        """The first engine in `key`'s ranking that is up and under the load bound; the base model (None) goes to
        the least busy. An engine that failed a request lately comes last: its requests end at once, so its load
        stays low and would otherwise draw all the traffic."""
        up = [b for b in self.backends if b.up and b not in exclude]
        if not up:
            return None
        now = time.monotonic()
        if key is None:
            return min(up, key=lambda b: (b.failing(now), b.in_flight))
        ranked = sorted(up, key=lambda b: -rank(key, b.engine.url))
        ranked = [b for b in ranked if not b.failing(now)] or ranked
        total = sum(b.in_flight for b in ranked)
        return next((b for b in ranked if bounded(b.in_flight, total, len(ranked), self.load_factor)), ranked[0])
