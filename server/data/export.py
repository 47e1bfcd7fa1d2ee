"""Exports: a tenant's stored completions of one adapter, with their feedback, as training rows (a correction
replaces the answer given) and preference pairs (chosen: the correction, rejected: the answer given), plus the
snapshot that records which records went in."""

import hashlib
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from server.data import CompletionStore
from server.data.records import CompletionRecord, Feedback, Snapshot


@dataclass
class Export:
    rows: list[tuple[str, dict]] = field(default_factory=list)  # (record id, trainer row)
    pairs: list[tuple[str, dict]] = field(default_factory=list)  # (record id, {"prompt", "chosen", "rejected"})
    skipped: list[str] = field(default_factory=list)  # "RECORD_ID: why"


def gather(store: CompletionStore, tenant: str, adapter: str, since: float | None,
           rating: Literal["up", "down"] | None, corrections: bool) -> Export:
    """The adapter's records (every version of it) that pass the filters, as rows and pairs."""
    records = list(store.scan(tenant, version_prefix=f"{adapter}@", since=since))
    feedback = _by_record(store.feedback(tenant, record_ids=[r.id for r in records]))
    out = Export()
    for record in records:
        given = feedback.get(record.id, [])
        score = sum(f.rating for f in given) / len(given) if given else 0.0
        correction = next((f.correction for f in sorted(given, key=lambda f: -f.created) if f.correction), None)
        if rating == "up" and not score > 0 or rating == "down" and not score < 0 or corrections and not correction:
            continue
        prompt, answer, why = _turns(record)
        if why:
            out.skipped.append(f"{record.id}: {why}")
            continue
        out.rows.append((record.id, _row(record, prompt, correction or answer)))
        if correction and correction != answer:
            out.pairs.append((record.id, {"prompt": prompt, "chosen": correction, "rejected": answer}))
    return out


def _by_record(feedback: Iterable[Feedback]) -> dict[str, list[Feedback]]:
    grouped: dict[str, list[Feedback]] = {}
    for f in feedback:
        grouped.setdefault(f.id, []).append(f)
    return grouped


def _turns(record: CompletionRecord) -> tuple[object, str, str | None]:
    """The prompt (messages or text), the first choice's answer, and why the record cannot be a row (or None)."""
    choices = record.response.get("choices") or []
    if not choices:
        return None, "", "the answer has no choices"
    if record.route == "completions":
        prompt = record.request.get("prompt")
        if not isinstance(prompt, str):
            return None, "", "the prompt is not one text (token ids or a list)"
        return prompt, choices[0].get("text") or "", None
    messages = record.request.get("messages") or []
    if any(not isinstance(m.get("content"), str) for m in messages):
        return None, "", "a message's content is not text"
    answer = (choices[0].get("message") or {}).get("content")
    if not isinstance(answer, str):
        return None, "", "the answer is not text (a tool call?)"
    return [{"role": m["role"], "content": m["content"]} for m in messages], answer, None


def _row(record: CompletionRecord, prompt: object, answer: str) -> dict:
    if record.route == "completions":
        return {"prompt": prompt, "completion": answer}
    return {"messages": [*prompt, {"role": "assistant", "content": answer}]}


def snapshot(tenant: str, adapter: str, record_ids: list[str], filters: dict) -> Snapshot:
    """The export's snapshot: a new id, the records' ids, the filters."""
    return Snapshot(id=f"snap-{secrets.token_hex(8)}", tenant=tenant, adapter=adapter, record_ids=tuple(record_ids),
                    filters=filters, created=time.time())


def snapshot_manifest(snap: Snapshot, counts: dict) -> dict:
    """What the export's folder says of itself: id, the hash of its record ids, counts and filters."""
    digest = hashlib.sha256("\n".join(sorted(snap.record_ids)).encode()).hexdigest()
    return {"id": snap.id, "tenant": snap.tenant, "adapter": snap.adapter, "records_sha256": digest,
            "records": len(snap.record_ids), "counts": counts, "filters": snap.filters, "created": snap.created}


def write_jsonl(path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
