"""Evaluations run by the gateway: a version scored through a serving engine, admitted and charged to its tenant as
its requests are."""

import asyncio
from dataclasses import dataclass

from server.core.config import Settings
from server.core.errors import APIError
from server.engine.client import Unreachable
from server.engine.routing import Router
from server.registry import VERSION_RE, NotFound, Registry
from server.rollout.evaluation import EvalSet, Scorer, compare
from server.tenancy.admission import Admission
from server.tenancy.usage import UsageLedger


@dataclass(kw_only=True)
class Evaluator:
    """The parts an evaluation uses."""

    settings: Settings
    registry: Registry
    router: Router
    admission: Admission
    usage: UsageLedger

    async def evaluate(self, name: str, version: int, evalset: EvalSet, against: str, tenant: str | None) -> dict:
        """Scores NAME@version on an engine beside `against`: "base", an alias of the adapter (the version it points
        at, not its canary) or a version number. Admitted and charged to `tenant` as its requests are."""
        candidate = (await asyncio.to_thread(self.registry.get, name, version)).key
        reference = self.settings.model_name if against == "base" else await asyncio.to_thread(
            self._reference, name, against)
        backend = self.router.choose(candidate)
        if backend is None:
            raise APIError(503, "no engine is ready", type="server_error", code="engine_unavailable")
        held = self.usage.admit(tenant, await asyncio.to_thread(evalset.token_bound), whole=True)
        concurrency = self.settings.eval_concurrency
        scorer = Scorer(lambda path, body: backend.engine.call(path, body, candidate), concurrency)
        try:
            with self.admission.admit(tenant, backend, slots=concurrency):
                return await compare(scorer, candidate, reference, evalset)
        except Unreachable:
            backend.unreachable()
            raise APIError(503, "engine unavailable", type="server_error", code="engine_unavailable") from None
        finally:
            if tenant is not None:
                self.usage.add(tenant, scorer.prompt_tokens, scorer.completion_tokens, held)

    def _reference(self, name: str, against: str) -> str:
        if VERSION_RE.fullmatch(against):  # ASCII digits: "²" is a digit to str.isdigit, and no number to int
            return self.registry.get(name, int(against)).key
        version = self.registry.aliases(name).get(against)
        if version is None:
            raise NotFound(f"against: {name!r} has no alias {against!r}", "against")
        return f"{name}@{version}"
