"""Every answer's ledger entry, and its stored completion when the tenant's data policy allows: noted on the request
path, built and written by the record writer's thread, so the request never waits on storage."""

import json
import time
from dataclasses import dataclass

from server.data.assembly import assemble
from server.data.policy import OPEN_TENANT, DataPolicy, Policies
from server.data.records import CompletionRecord, LedgerEntry
from server.data.redaction import redact
from server.data.writer import RecordWriter
from server.gateway.context import RequestContext


@dataclass(kw_only=True)
class Capture:
    """Hands each /v1 request an Answer that notes what it needs while the request runs."""

    policies: Policies
    writer: RecordWriter

    def begin(self, ctx: RequestContext, raw: bytes) -> "Answer":
        policy = self.policies.of(ctx.tenant)
        return Answer(ctx, raw, policy if policy.stores(ctx.body.store) else None, self.writer)


class Answer:
    """One request's answer as the caller receives it: a whole document, a large one in chunks, or a stream's
    events; `finish` queues its ledger entry, and its record when stored, once the answer is complete."""

    def __init__(self, ctx: RequestContext, raw: bytes, policy: DataPolicy | None, writer: RecordWriter):
        self.ctx, self.raw, self.policy, self.writer = ctx, raw, policy, writer
        self.stored = policy is not None
        self.parts: list[bytes] = []
        self.streamed = False
        self.first: float | None = None
        self.complete = False
        self.total = self.created = 0.0  # set by finish

    def whole(self, content: bytes) -> None:
        if self.stored:
            self.parts.append(content)
        self.complete = True

    def chunk(self, data: bytes) -> None:
        """A piece of a stored answer: of a large non-streamed document, or of a stream's events (the relays show
        pieces of stored answers only)."""
        if self.first is None:
            self.first = time.perf_counter()
        self.parts.append(data)

    def ended(self, streamed: bool) -> None:
        """The engine's answer ended normally (a stream with [DONE])."""
        self.streamed, self.complete = streamed, True

    def finish(self) -> None:
        if self.complete:
            self.total = time.perf_counter() - self.ctx.timer.start
            self.created = time.time()
            self.writer.put(self)

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.ctx.path.endswith('chat/completions') else 'cmpl'}-{self.ctx.answer_id}"

    @property
    def ledger(self) -> LedgerEntry:
        target = self.ctx.target
        return LedgerEntry(self.id, self.ctx.tenant or OPEN_TENANT, self.ctx.key_id,
                           target.version.key if target else None, self.created)

    def record(self) -> CompletionRecord | None:
        """The stored completion, built in the writer's thread; None when the policy does not store it."""
        if self.policy is None:
            return None
        chat = self.ctx.path.endswith("chat/completions")
        body = b"".join(self.parts)
        response = assemble(body.split(b"\n\n"), chat) if self.streamed else json.loads(body)
        request = json.loads(self.raw)
        names = self.policy.redact
        ledger, timer = self.ledger, self.ctx.timer
        prompt, completion = timer.tokens or (0, 0)
        timings = {"total": round(self.total, 6)}
        if self.first is not None and self.streamed:
            timings["first_token"] = round(self.first - timer.start, 6)
        return CompletionRecord(
            id=ledger.id, tenant=ledger.tenant, key_id=ledger.key_id,
            route="chat.completions" if chat else "completions",
            model=self.ctx.named, version=ledger.version, created=ledger.created, request=redact(request, names),
            response=redact(response, names), request_id=self.ctx.request_id, user=self.ctx.body.user,
            metadata=redact(self.ctx.body.metadata or {}, names), usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                                         "total_tokens": prompt + completion}, timings=timings)
