"""Automatic rollouts: a candidate version's share of an alias grows step by step while its error ratio and p95
latency stay within bounds of the version the alias points at, measured over the same window, and drops to nothing
at once when they do not.

Everything lives in one document beside the registry (`rollouts.json`: in the store, or STATE_DIR beside a
directory registry), so a rollout survives restarts and every replica sees it: each gateway publishes its per-version
counts there, and one gateway at a time decides, under a lease it takes in the same conditional write."""

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field, field_validator

from server.core.periodic import every
from server.data.records import Feedback
from server.observability.audit import AuditLog
from server.registry import Conflict, InvalidReference, Registry, RegistryError
from server.store.documents import Document
from server.store.lease import take
from server.store.streams import stream_id

log = logging.getLogger("loraplex.rollout")

ROLLOUTS_FILE = "rollouts.json"
LEASE_SECONDS = 10.0
# Latency histogram: 10% wide buckets from 1 ms to about 27 minutes; counts from every replica add up.
BUCKETS = tuple(0.001 * 1.1 ** i for i in range(150))


class RolloutSpec(BaseModel):
    """A rollout to start: the candidate, the weights it goes through, and the bounds it must keep."""

    to: int = Field(ge=1, description="Candidate version.")
    steps: list[float] = Field([5, 25, 50, 100], description="Percent of the alias's callers at each step; the "
                                                             "last, 100, promotes.")
    interval: float = Field(600, gt=0, description="Seconds each step lasts before the next, if its bounds hold.")
    min_requests: int = Field(20, ge=1, description="Requests each side needs in a window before any decision.")
    max_error_increase: float = Field(0.02, ge=0, le=1, description="The candidate's error ratio may exceed the "
                                                                    "stable version's by this much.")
    latency_tolerance: float = Field(0.25, ge=0, description="The candidate's p95 latency may exceed the stable "
                                                             "version's by this fraction (runs here vary by 18%).")
    require_evaluation: bool = Field(False, description="Refuse a candidate that has no passing evaluation (one "
                                                        "whose evaluation failed is refused either way).")
    max_down_increase: float | None = Field(None, ge=0, le=1, description="The feedback gate: the candidate's share "
                                            "of down ratings (POST /v1/feedback) may exceed the stable version's by "
                                            "this much over the window; unset, feedback is not consulted.")
    min_feedback: int = Field(10, ge=1, description="Ratings each side needs in a window before the feedback gate "
                                                    "decides.")

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps or steps[-1] != 100 or any(not 0 < w <= 100 for w in steps) or steps != sorted(set(steps)):
            raise ValueError("must rise from above 0 to 100, each step once (5,25,50,100)")
        return steps


@dataclass
class Counts:
    """One version's requests, errors and latency histogram in one window."""

    requests: int = 0
    errors: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def add(self, failed: bool, seconds: float) -> None:
        self.requests += 1
        self.errors += failed
        self.histogram[_bucket(seconds)] += 1

    def merge(self, other: dict) -> None:
        self.requests += other["requests"]
        self.errors += other["errors"]
        self.histogram = [a + b for a, b in zip(self.histogram, other["histogram"])]

    def p95(self) -> float:
        need, seen = math.ceil(0.95 * self.requests), 0
        for i, n in enumerate(self.histogram):
            seen += n
            if seen >= need:
                return BUCKETS[i] if i < len(BUCKETS) else math.inf
        return 0.0

    def figures(self) -> dict:
        return {"requests": self.requests, "error_ratio": round(self.errors / max(self.requests, 1), 4),
                "p95_seconds": round(self.p95(), 4)}


def _bucket(seconds: float) -> int:
    if seconds <= BUCKETS[0]:
        return 0
    return min(len(BUCKETS), math.ceil(math.log(seconds / BUCKETS[0], 1.1) - 1e-9))


def judge(record: dict, stable: Counts, candidate: Counts, now: float) -> tuple[str, str]:
    """("wait" | "rollback" | "step", why) for a running rollout's window."""
    bounds, need = record["bounds"], record["min_requests"]
    if stable.requests < need or candidate.requests < need:
        return "wait", f"{min(stable.requests, candidate.requests)} of {need} requests on each side"
    s, c = stable.figures(), candidate.figures()
    if c["error_ratio"] > s["error_ratio"] + bounds["max_error_increase"]:
        return "rollback", (f"error ratio {c['error_ratio']:.2%} against the stable version's {s['error_ratio']:.2%} "
                            f"(allowed +{bounds['max_error_increase']:.2%})")
    if c["p95_seconds"] > s["p95_seconds"] * (1 + bounds["latency_tolerance"]):
        return "rollback", (f"p95 latency {c['p95_seconds']:.3f} s against the stable version's "
                            f"{s['p95_seconds']:.3f} s (allowed +{bounds['latency_tolerance']:.0%})")
    if now - record["step_started"] < record["interval"]:
        return "wait", "within bounds; the step's interval has not passed"
    return "step", (f"within bounds: error ratio {c['error_ratio']:.2%} against {s['error_ratio']:.2%}, p95 "
                    f"{c['p95_seconds']:.3f} s against {s['p95_seconds']:.3f} s")


@dataclass
class Ratings:
    """One version's feedback in one window."""

    rated: int = 0
    down: int = 0

    def add(self, rating: float) -> None:
        self.rated += 1
        self.down += rating < 0

    @property
    def down_ratio(self) -> float:
        return self.down / self.rated if self.rated else 0.0


def weigh(bounds: dict, stable: Ratings, candidate: Ratings) -> tuple[str, str] | None:
    """("wait" | "rollback", why) when feedback holds a step back; None when it lets the verdict stand."""
    need, allowed = bounds["min_feedback"], bounds["max_down_increase"]
    if stable.rated < need or candidate.rated < need:
        return "wait", f"{min(stable.rated, candidate.rated)} of {need} ratings on each side"
    if candidate.down_ratio > stable.down_ratio + allowed:
        return "rollback", (f"down ratings {candidate.down_ratio:.0%} of {candidate.rated} against the stable "
                            f"version's {stable.down_ratio:.0%} of {stable.rated} (allowed +{allowed:.0%})")
    return None


class Rollouts:
    """This gateway's part in every rollout: counting its requests, publishing them, and deciding while it leads."""

    def __init__(self, document: Document, registry: Registry, audit: AuditLog, clock: Callable[[], float] = time.time,
                 changed: Callable[[str], None] | None = None,
                 feedback: Callable[[float], list[Feedback]] | None = None):
        self.document, self.registry, self.audit, self.clock = document, registry, audit, clock
        # Every tenant's feedback since a time (a public adapter's callers are of many): the feedback gate's evidence.
        self.feedback = feedback
        self.changed = changed  # told the adapter's name after each change a rollout makes to its aliases
        self.id = stream_id()
        self.watch: dict[tuple[str, int], str] = {}  # (name, version) under a running rollout -> its key
        self._windows: dict[str, float] = {}  # key -> the window being counted (its step's start)
        self._counts: dict[str, dict[int, Counts]] = {}

    def start(self, name: str, alias: str, spec: RolloutSpec, actor: str) -> dict:
        """Begins a rollout: the candidate gets the first step's share at once (a thread's work)."""
        key = f"{name}@{alias}"
        current = self.registry.aliases(name).get(alias)
        if current is None:
            raise InvalidReference(f"alias {alias!r} of {name!r} points at no version: set it first", "alias")
        running = (self.document.read() or {}).get("rollouts", {}).get(key, {})
        if running.get("status") == "running":
            raise Conflict(f"{key} is already rolling out version {running['to']}; abort it first", "alias")
        self._check_evaluation(name, spec)
        weight = spec.steps[0]
        if weight == 100:
            self.registry.set_alias(name, alias, spec.to)
        else:
            self.registry.set_canary(name, alias, spec.to, weight)
        now = self.clock()
        record = {"name": name, "alias": alias, "from": current, "to": spec.to, "steps": spec.steps, "step": 0,
                  "weight": weight, "interval": spec.interval, "min_requests": spec.min_requests,
                  "bounds": {"max_error_increase": spec.max_error_increase,
                             "latency_tolerance": spec.latency_tolerance,
                             "max_down_increase": spec.max_down_increase, "min_feedback": spec.min_feedback},
                  "status": "running" if weight < 100 else "promoted", "started": now, "step_started": now,
                  "started_by": actor, "decisions": [], "stats": {}}
        self.document.update(lambda doc: doc.setdefault("rollouts", {}).__setitem__(key, record))
        return public(record)

    def _check_evaluation(self, name: str, spec: RolloutSpec) -> None:
        """The evaluation gate: a candidate whose latest evaluation failed does not roll out."""
        evaluation = self.registry.evaluations(name).get(spec.to)
        if evaluation is not None and not evaluation["passed"]:
            raise Conflict(f"{name}@{spec.to} failed its evaluation ({evaluation['verdict']}); evaluate it again "
                           "or roll out another version", "to")
        if evaluation is None and spec.require_evaluation:
            raise Conflict(f"{name}@{spec.to} has no evaluation: run `loraplex eval {name}@{spec.to}` first", "to")

    def observe(self, key: str, version: int, failed: bool, seconds: float) -> None:
        """Counts one finished request of a version under rollout (the request path: memory only)."""
        window = self._windows.get(key)
        if window is not None:
            self._counts.setdefault(key, {}).setdefault(version, Counts()).add(failed, seconds)

    async def keep_current(self, poll: float) -> None:
        """Runs `tick` every `poll` seconds, on a thread."""
        await every(poll, lambda: asyncio.to_thread(self.tick), "a rollout step failed")

    def tick(self) -> None:
        """Publishes this gateway's counts, takes or renews the lease of each running rollout it can, and decides
        those it leads (a thread's work, every REGISTRY_POLL seconds)."""
        if not self.watch and not (self.document.read() or {}).get("rollouts"):
            return
        now = self.clock()
        decided: list[tuple[dict, str, str]] = []

        def change(doc: dict) -> None:
            decided.clear()
            for key, record in doc.get("rollouts", {}).items():
                if record["status"] != "running":
                    continue
                self._publish(key, record)
                if take(record, self.id, now, LEASE_SECONDS):
                    verdict = self._decide(record, now)
                    if verdict is not None:
                        decided.append((record, *verdict))

        self.document.update(change)
        for record, verdict, why in decided:
            self._apply(record, verdict, why)
        self._follow((self.document.read() or {}).get("rollouts", {}))

    def _publish(self, key: str, record: dict) -> None:
        window = self._windows.get(key)
        if window == record["step_started"]:
            counts = self._counts.get(key, {})
            record.setdefault("stats", {})[self.id] = {
                "window": window, "versions": {str(v): vars(c) for v, c in counts.items()}}

    def _decide(self, record: dict, now: float) -> tuple[str, str] | None:
        """Changes the record for a decision and returns it; None while it waits."""
        canary = self.registry.canaries(record["name"]).get(record["alias"])
        if canary is None or canary["version"] != record["to"]:
            record["status"] = "ended"
            return "ended", "the alias's canary was changed by hand"
        sides = {record["from"]: Counts(), record["to"]: Counts()}
        for published in record.get("stats", {}).values():
            if published["window"] == record["step_started"]:
                for version, counts in published["versions"].items():
                    if int(version) in sides:
                        sides[int(version)].merge(counts)
        evaluation = self.registry.evaluations(record["name"]).get(record["to"])
        if evaluation is not None and not evaluation["passed"]:
            verdict, why = "rollback", f"its evaluation failed: {evaluation['verdict']}"
        else:
            verdict, why = judge(record, sides[record["from"]], sides[record["to"]], now)
            if verdict != "rollback" and record["bounds"].get("max_down_increase") is not None:
                verdict, why = self._feedback_gate(record, verdict, why)
        if verdict == "wait":
            return None
        figures = {"stable": sides[record["from"]].figures(), "candidate": sides[record["to"]].figures()}
        if verdict == "rollback":
            record["status"] = "rolled_back"
        else:
            record["step"] += 1
            record["weight"], record["step_started"], record["stats"] = record["steps"][record["step"]], now, {}
            if record["weight"] == 100:
                verdict, record["status"] = "promote", "promoted"
        record["decisions"].append({"time": now, "decision": verdict, "weight": record["weight"], "why": why,
                                    "figures": figures})
        return verdict, why

    def _feedback_gate(self, record: dict, verdict: str, why: str) -> tuple[str, str]:
        """The verdict once feedback over the window is weighed: each side's share of down ratings."""
        if self.feedback is None:
            return verdict, why
        ratings = {v: Ratings() for v in (record["from"], record["to"])}
        for given in self.feedback(record["step_started"]):
            name, _, version = (given.version or "").partition("@")
            if name == record["name"] and version.isdigit() and int(version) in ratings:
                ratings[int(version)].add(given.rating)
        gate = weigh(record["bounds"], ratings[record["from"]], ratings[record["to"]])
        return gate if gate is not None else (verdict, why)

    def _apply(self, record: dict, verdict: str, why: str) -> None:
        name, alias, to = record["name"], record["alias"], record["to"]
        try:
            if verdict == "step":
                self.registry.set_canary(name, alias, to, record["weight"])
            elif verdict == "promote":
                self.registry.promote(name, alias)
            elif verdict == "rollback":
                self.registry.abort(name, alias)
            result = "ok"
            if self.changed is not None:
                self.changed(name)
        except RegistryError as e:
            result = f"refused: {e}"
            log.warning("rollout of %s@%s to %s: %s failed: %s", name, alias, to, verdict, e)
        self.audit.record(f"rollout ({record['started_by']})", f"rollout_{verdict}", name, to, result=result,
                          tenant=self.registry.tenant(name), alias=alias, weight=record["weight"], reason=why,
                          figures=record["decisions"][-1]["figures"] if record["decisions"] else None)

    def _follow(self, rollouts: dict) -> None:
        """What the request path counts: the two versions of each running rollout, in its current window."""
        running = {k: r for k, r in rollouts.items() if r["status"] == "running"}
        self.watch = {(r["name"], v): k for k, r in running.items() for v in (r["from"], r["to"])}
        for key, record in running.items():
            if self._windows.get(key) != record["step_started"]:
                self._windows[key], self._counts[key] = record["step_started"], {}
        for key in set(self._windows) - set(running):
            del self._windows[key]
            self._counts.pop(key, None)

    def of(self, name: str) -> list[dict]:
        """The rollouts of one adapter, as `adapters show` prints them."""
        return [public(r) for r in (self.document.read() or {}).get("rollouts", {}).values() if r["name"] == name]


def public(record: dict) -> dict:
    """A rollout record without the per-gateway counts and the lease."""
    return {k: v for k, v in record.items() if k not in ("stats", "lease")}
