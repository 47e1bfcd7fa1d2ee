"""The data loop's commands, acting on the store beside the registry directly: a tenant's data policy, and exports
of stored completions into training data."""

import json
from pathlib import Path

import typer

from server.cli.conventions import REASON, actor, echo_json, fail, load_settings


def tenants_policy(
    tenant: str = typer.Argument(..., help="The tenant."),
    capture: str = typer.Option(None, help="off, opt-in (only requests with \"store\": true) or on (all but "
                                           "\"store\": false)."),
    retention: str = typer.Option(None, help="How long stored completions are kept: 12h, 30d."),
    redact: str = typer.Option(None, help="Comma-separated patterns replaced before anything is written: email, "
                                          "phone; empty for none."),
    reason: str = REASON,
) -> None:
    """Show or set a tenant's data policy (options not given keep their value)."""
    from pydantic import ValidationError

    from server.data.policy import POLICIES_FILE, DataPolicy, Policies
    from server.observability.audit import AuditLog
    from server.registry import InvalidReference, check_name
    from server.store.documents import shared_document

    settings = load_settings()
    try:
        check_name(tenant, "tenant")
    except InvalidReference as e:
        fail(f"TENANT: {e}")
    policies = Policies(shared_document(settings.registry, settings.state_dir, POLICIES_FILE))
    changes = {k: v for k, v in {"capture": capture, "retention": retention}.items() if v is not None}
    if redact is not None:
        changes["redact"] = [p.strip() for p in redact.split(",") if p.strip()]
    if changes:
        try:
            policy = DataPolicy(**{**policies.of(tenant).model_dump(), **changes})
        except ValidationError as e:
            err = e.errors()[0]
            fail(f"--{err['loc'][0]}: {err['msg']}")
        policies.set(tenant, policy)
        AuditLog(settings.state_dir, settings.registry).record(actor(), "data_policy", tenant=tenant, reason=reason,
                                                               **policy.model_dump())
    echo_json({"tenant": tenant, **policies.of(tenant).model_dump()})


def data_export(
    tenant: str = typer.Option(..., help="The tenant whose stored completions are exported."),
    adapter: str = typer.Option(..., help="Export the records every version of this adapter answered."),
    out: Path = typer.Option(..., help="Directory to write train.jsonl, pairs.jsonl and snapshot.json to."),
    since: str = typer.Option(None, help="Only records since: 7d, 12h, or an ISO 8601 time."),
    rating: str = typer.Option(None, help="up or down: only records whose feedback averages above (below) 0."),
    corrections: bool = typer.Option(False, "--corrections", help="Only records with a correction."),
    max_seq_len: int = typer.Option(512, help="Rows longer than this many tokens (chat template applied) are "
                                              "dropped."),
) -> None:
    """Export stored completions as training rows (a correction replaces the answer) run through the trainer's
    curation, preference pairs for DPO, and a snapshot manifest that versions trained on them record."""
    from server.core.durations import parse_since
    from server.data import open_store
    from server.data.export import gather, snapshot, snapshot_manifest, write_jsonl

    settings = load_settings()
    if rating not in (None, "up", "down"):
        fail(f"--rating {rating!r}: up or down")
    try:
        start = parse_since(since) if since else None
    except ValueError as e:
        fail(f"--since: {e}")
    if out.exists() and any(out.iterdir()):
        fail(f"--out {out}: exists and is not empty")
    store = open_store(settings.registry, settings.state_dir)
    found = gather(store, tenant, adapter, start, rating, corrections)
    for line in found.skipped:
        typer.echo(f"skipped {line}", err=True)
    rows, counts = _curated(found.rows, settings.base_model, max_seq_len)
    kept = {record_id for record_id, _ in rows}
    pairs = [pair for record_id, pair in found.pairs if record_id in kept]
    filters = {"adapter": adapter, "since": since, "rating": rating, "corrections": corrections}
    snap = snapshot(tenant, adapter, sorted(kept), filters)
    store.save_snapshot(snap)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", (row for _, row in rows))
    write_jsonl(out / "pairs.jsonl", pairs)
    manifest = snapshot_manifest(snap, {**counts, "skipped": len(found.skipped), "pairs": len(pairs)})
    (out / "snapshot.json").write_text(json.dumps(manifest, indent=2) + "\n")
    typer.echo(f"exported {len(rows)} rows and {len(pairs)} preference pairs to {out} (snapshot {snap.id})")


def _curated(rows: list[tuple[str, dict]], base_model: str, max_seq_len: int) -> tuple[list[tuple[str, dict]], dict]:
    """The trainer's curation (empty rows, exact and near duplicates, length), each row named by its record id."""
    from transformers import AutoTokenizer

    from server.core.examples import DataError, parse_row
    from server.trainer.data import curate
    from server.trainer.train import count_tokens

    by_id, examples = dict(rows), []
    for record_id, row in rows:
        try:
            examples.append(parse_row(row, record_id))
        except DataError as e:
            typer.echo(f"skipped {e}", err=True)
    counter = count_tokens(AutoTokenizer.from_pretrained(base_model))
    kept, counts = curate(examples, counter, max_seq_len, 0.8, log=lambda line: typer.echo(line, err=True))
    return [(e.where, by_id[e.where]) for e in kept], counts
