"""Chooses the engine for a request: adapter affinity by rendezvous hashing, spread by traffic, bounded load.

Every adapter version ranks the engines by a hash of (version, engine URL), the same on every gateway without
talking to each other, so a version keeps to its first engine and stays loaded there; an engine joining or leaving
moves only the versions it ranks first. A version with a larger share of the traffic uses more of its ranking (the
least busy of its first k), and an engine loaded past `load_factor` times the mean passes requests down the ranking.
"""

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.client import EngineClient
from server.engine.process import EngineProcess


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


MIN_SPREAD_REQUESTS = 8
PRUNE_AT = 16384  # versions whose traffic shares are remembered before the quiet ones are forgotten


def rank(key: str, url: str) -> int:
    """The engine's rendezvous score for `key`: a stable hash, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


def bounded(in_flight: int, total: int, engines: int, load_factor: float) -> bool:
    """Whether an engine with `in_flight` requests may take one more: under load_factor x the mean, counting it."""
    return in_flight + 1 <= max(1.0, load_factor * (total + 1) / engines)


class Router:
    """`per_engine`: the share of one engine's traffic a version may bring to each engine it uses; `half_life`:
    seconds over which traffic shares are measured. Measured in the routing benchmark (BENCHMARKS.md)."""

    def __init__(self, backends: list[Backend], load_factor: float = 2.0, per_engine: float = 0.25,
                 half_life: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.backends = backends
        self.load_factor, self.per_engine, self.half_life, self.clock = load_factor, per_engine, half_life, clock
        self._counts: dict[str, tuple[float, float]] = {}  # version -> (decayed request count, when)
        self._total = (0.0, 0.0)
        self._prune_at = PRUNE_AT

    def choose(self, key: str | None, exclude: tuple[Backend, ...] = ()) -> Backend | None:
        """The least busy of the first k engines in `key`'s ranking that are up, or further down the ranking if that
        one is over the load bound; the base model (None) goes to the least busy. An engine that failed a request
        lately comes last: its requests end at once, so its load stays low and would otherwise draw all traffic."""
        up = [b for b in self.backends if b.up and b not in exclude]
        if not up:
            return None
        now = self.clock()
        if key is None:
            return min(up, key=lambda b: (b.failing(now), b.in_flight))
        ranked = sorted(up, key=lambda b: -rank(key, b.engine.url))
        ranked = [b for b in ranked if not b.failing(now)] or ranked
        spread = min(len(ranked), max(1, math.ceil(self._share(key, now) * len(ranked) / self.per_engine - 1e-9)))
        home = min(ranked[:spread], key=lambda b: b.in_flight)
        total = sum(b.in_flight for b in ranked)
        if bounded(home.in_flight, total, len(ranked), self.load_factor):
            return home
        return next((b for b in ranked[spread:] if bounded(b.in_flight, total, len(ranked), self.load_factor)), home)

    def _share(self, key: str, now: float) -> float:
        """This request's version's share of recent requests, counting this one (exponentially decayed counts)."""
        def decayed(count: float, when: float) -> float:
            return count * 0.5 ** ((now - when) / self.half_life)

        count = decayed(*self._counts.get(key, (0.0, now))) + 1
        self._counts[key] = (count, now)
        self._total = (decayed(*self._total) + 1, now)
        if len(self._counts) > self._prune_at:  # forget versions whose traffic has decayed to nothing
            self._counts = {k: v for k, v in self._counts.items() if decayed(*v) >= 0.01}
            self._prune_at = max(PRUNE_AT, 2 * len(self._counts))  # so pruning stays rare, however many are live
        # A handful of recent requests never needs a second engine, however large a share of little traffic it is.
        return count / self._total[0] if count >= MIN_SPREAD_REQUESTS else 0.0
