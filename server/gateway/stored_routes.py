"""OpenAI's stored chat completions (list, retrieve, update, delete, messages) and feedback on answers, so the
official client works unchanged. A tenant-admin key sees its tenant's records, an inference key those it created;
another tenant's (or key's) record answers exactly as a missing one."""

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from server.core.errors import APIError
from server.core.protocol import Metadata
from server.data import CompletionStore, Feedback, ListQuery
from server.data.policy import OPEN_TENANT
from server.data.records import CompletionRecord
from server.gateway.auth import v1_caller
from server.observability.metrics import Metrics
from server.tenancy.keys import Caller

router = APIRouter(prefix="/v1")
CompletionId = Path(max_length=128)
MAX_CORRECTION = 32_768
MAX_COMMENT = 4_096


@dataclass(frozen=True)
class Scope:
    """Whose records a caller reads: its tenant's, and only its own key's unless it is the tenant's admin."""

    tenant: str
    key_id: str | None  # None: every key's


def scope_of(caller: Caller | None) -> Scope:
    if caller is None:  # a gateway without keys: one open tenant
        return Scope(OPEN_TENANT, None)
    tenant = caller.tenant or OPEN_TENANT
    return Scope(tenant, None if caller.role in ("tenant-admin", "admin") else caller.key_id)


async def scoped(caller: Caller | None = Depends(v1_caller)) -> Scope:
    return scope_of(caller)


def _store(request: Request) -> CompletionStore:
    return request.app.state.data


def _missing(record_id: str) -> APIError:
    return APIError(404, f"No chat completion found with id {record_id[:128]!r}", param="completion_id",
                    code="not_found")


async def _record(request: Request, scope: Scope, record_id: str) -> CompletionRecord:
    record = await asyncio.to_thread(_store(request).get, scope.tenant, record_id)
    if record is None or record.route != "chat.completions" or scope.key_id not in (None, record.key_id):
        raise _missing(record_id)
    return record


def completion(record: CompletionRecord) -> dict:
    """The stored answer as OpenAI's ChatCompletion, with its metadata."""
    return {**record.response, "id": record.id, "metadata": record.metadata, "request_id": record.request_id}


@router.get("/chat/completions")
async def list_completions(request: Request, scope: Scope = Depends(scoped), model: str | None = Query(None),
                           after: str | None = Query(None, max_length=128), limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "asc") -> dict:
    """Stored chat completions, filtered by `model` (as the caller named it) and `metadata[KEY]=VALUE` pairs."""
    metadata = _metadata_filter(request)
    query = ListQuery(key_id=scope.key_id, model=model, metadata=metadata, after=after, limit=limit, order=order)
    records, more = await asyncio.to_thread(_store(request).page, scope.tenant, query)
    data = [completion(r) for r in records]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def _metadata_filter(request: Request) -> dict[str, str]:
    pairs = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
             if k.startswith("metadata[") and k.endswith("]")}
    if len(pairs) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in pairs.items()):
        raise APIError(400, "metadata: at most 16 pairs, keys up to 64 characters, values up to 512",
                       param="metadata", code="invalid_value")
    return pairs


@router.get("/chat/completions/{completion_id}")
async def retrieve(request: Request, completion_id: str = CompletionId, scope: Scope = Depends(scoped)) -> dict:
    return completion(await _record(request, scope, completion_id))


class UpdateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None = Field(description="Replaces the stored metadata; null clears it.")


@router.post("/chat/completions/{completion_id}")
async def update(body: UpdateBody, request: Request, completion_id: str = CompletionId,
                 scope: Scope = Depends(scoped)) -> dict:
    await _record(request, scope, completion_id)
    record = await asyncio.to_thread(_store(request).set_metadata, scope.tenant, completion_id, body.metadata or {})
    if record is None:
        raise _missing(completion_id)
    return completion(record)


@router.delete("/chat/completions/{completion_id}")
async def delete(request: Request, completion_id: str = CompletionId, scope: Scope = Depends(scoped)) -> dict:
    await _record(request, scope, completion_id)
    if not await asyncio.to_thread(_store(request).delete, scope.tenant, completion_id):
        raise _missing(completion_id)
    return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}


@router.get("/chat/completions/{completion_id}/messages")
async def messages(request: Request, completion_id: str = CompletionId, scope: Scope = Depends(scoped),
                   after: str | None = Query(None, max_length=160), limit: int = Query(20, ge=1, le=100),
                   order: Literal["asc", "desc"] = "asc") -> dict:
    """The request's messages, each with an id (COMPLETION_ID-INDEX), paged as OpenAI pages them."""
    record = await _record(request, scope, completion_id)
    listed = [{"id": f"{record.id}-{i}", **m} for i, m in enumerate(record.request.get("messages") or [])]
    if order == "desc":
        listed.reverse()
    ids = [m["id"] for m in listed]
    start = ids.index(after) + 1 if after in ids else 0
    page = listed[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(listed)}


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=128, description="The answer's id (chatcmpl-… or cmpl-…).")
    rating: Literal["up", "down"] | float = Field(description='"up", "down", or a number in [-1, 1]: above 0 '
                                                             "counts as up, below 0 as down, 0 as neutral.")
    correction: str | None = Field(None, max_length=MAX_CORRECTION, description="The answer it should have been.")
    comment: str | None = Field(None, max_length=MAX_COMMENT)

    @property
    def score(self) -> float:
        if isinstance(self.rating, str):
            return 1.0 if self.rating == "up" else -1.0
        if not -1 <= self.rating <= 1:
            raise APIError(400, "rating: a number must be within [-1, 1]", param="rating", code="invalid_value")
        return float(self.rating)


def rating_label(score: float) -> str:
    return "up" if score > 0 else "down" if score < 0 else "neutral"


@router.post("/feedback")
async def post_feedback(body: FeedbackBody, request: Request, caller: Caller | None = Depends(v1_caller)) -> dict:
    """Feedback on an answer, by the key that made the request or its tenant's admin; a later post by the same key
    replaces it."""
    scope, score = scope_of(caller), body.score
    entry = await asyncio.to_thread(_store(request).ledger, scope.tenant, body.id)
    if entry is None or scope.key_id not in (None, entry.key_id):
        raise APIError(404, f"No answer found with id {body.id!r}", param="id", code="not_found")
    feedback = Feedback(id=body.id, tenant=scope.tenant, key_id=caller.key_id if caller else "open",
                        version=entry.version, rating=score, correction=body.correction, comment=body.comment,
                        created=time.time())
    await asyncio.to_thread(_store(request).put_feedback, feedback)
    metrics: Metrics = request.app.state.metrics
    name = entry.version.split("@")[0] if entry.version else None
    metrics.feedback.labels(metrics.adapter_label(name), entry.version or "base", rating_label(score)).inc()
    return {"object": "feedback", "id": body.id, "rating": score, "version": entry.version}


@router.delete("/feedback/{completion_id}")
async def retract_feedback(request: Request, completion_id: str = CompletionId,
                           caller: Caller | None = Depends(v1_caller)) -> dict:
    """Retracts the caller's feedback on an answer (a tenant-admin: everyone's)."""
    scope = scope_of(caller)
    key = None if scope.key_id is None else caller.key_id
    if not await asyncio.to_thread(_store(request).delete_feedback, scope.tenant, completion_id, key):
        raise APIError(404, f"No feedback found on {completion_id!r}", param="id", code="not_found")
    return {"object": "feedback.deleted", "id": completion_id, "deleted": True}
