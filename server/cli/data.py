"""The data loop's commands, acting on the store beside the registry directly: a tenant's data policy, and exports
of stored completions into training data."""

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from server.cli.conventions import REASON, actor, echo_json, fail, load_settings
from server.core.config import Settings

if TYPE_CHECKING:
    from server.registry import Registry, Version
    from server.rollout.rollouts import RolloutSpec
    from server.trainer.job import Job


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
    settings = load_settings()
    if rating not in (None, "up", "down"):
        fail(f"--rating {rating!r}: up or down")
    start = _since(since)
    if out.exists() and any(out.iterdir()):
        fail(f"--out {out}: exists and is not empty")
    rows, pairs, snap_id = export(settings, tenant, adapter, start, out, rating=rating, corrections=corrections,
                                  max_seq_len=max_seq_len, since_text=since)
    typer.echo(f"exported {rows} rows and {pairs} preference pairs to {out} (snapshot {snap_id})")


def _since(since: str | None) -> float | None:
    from server.core.durations import parse_since

    try:
        return parse_since(since) if since else None
    except ValueError as e:
        fail(f"--since: {e}")


def export(settings: Settings, tenant: str, adapter: str, start: float | None, out: Path, *,
           rating: str | None = None, corrections: bool = False, max_seq_len: int = 512,
           since_text: str | None = None) -> tuple[int, int, str]:
    """Writes an export into `out`: curated rows, pairs and the snapshot (also kept in the store); their counts and
    the snapshot's id."""
    from server.data import open_store
    from server.data.export import gather, snapshot, snapshot_manifest, write_jsonl

    store = open_store(settings.registry, settings.state_dir)
    found = gather(store, tenant, adapter, start, rating, corrections)
    for line in found.skipped:
        typer.echo(f"skipped {line}", err=True)
    rows, counts = _curated(found.rows, settings.base_model, max_seq_len)
    kept = {record_id for record_id, _ in rows}
    pairs = [pair for record_id, pair in found.pairs if record_id in kept]
    filters = {"adapter": adapter, "since": since_text, "rating": rating, "corrections": corrections}
    snap = snapshot(tenant, adapter, sorted(kept), filters)
    store.save_snapshot(snap)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", (row for _, row in rows))
    write_jsonl(out / "pairs.jsonl", pairs)
    manifest = snapshot_manifest(snap, {**counts, "skipped": len(found.skipped), "pairs": len(pairs)})
    (out / "snapshot.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return len(rows), len(pairs), snap.id


def _curated(rows: list[tuple[str, dict]], base_model: str, max_seq_len: int) -> tuple[list[tuple[str, dict]], dict]:
    """The trainer's curation (empty rows, exact and near duplicates, length), each row named by its record id."""
    from transformers import AutoTokenizer

    from server.core.examples import DataError, parse_row
    from server.trainer.data import curate
    from server.trainer.model import count_tokens

    by_id, examples = dict(rows), []
    for record_id, row in rows:
        try:
            examples.append(parse_row(row, record_id))
        except DataError as e:
            typer.echo(f"skipped {e}", err=True)
    counter = count_tokens(AutoTokenizer.from_pretrained(base_model))
    kept, counts = curate(examples, counter, max_seq_len, 0.8, log=lambda line: typer.echo(line, err=True))
    return [(e.where, by_id[e.where]) for e in kept], counts


def refresh(
    name: str = typer.Argument(..., help="The adapter to refresh from its stored completions and their feedback."),
    since: str = typer.Option("7d", help="Records since: 7d, 12h, or an ISO 8601 time."),
    job: Path = typer.Option(None, help="The training job; default the one that produced the stable version."),
    method: str = typer.Option("sft", help="sft (rows, corrections replacing answers) or dpo (pairs, from stable)."),
    steps: str = typer.Option("10,50,100", help="The canary's steps, percent of stable's callers."),
    interval: float = typer.Option(600, help="Seconds each canary step lasts."),
    max_down_increase: float = typer.Option(0.05, help="The feedback gate: the candidate's share of down ratings "
                                                       "may exceed stable's by this much."),
    min_feedback: int = typer.Option(10, help="Ratings each side needs per window before the feedback gate decides."),
    min_requests: int = typer.Option(20, help="Requests each side needs per window before any decision."),
    latency_tolerance: float = typer.Option(0.25, help="The candidate's p95 latency may exceed stable's by this "
                                                       "fraction."),
    work: Path = typer.Option(Path("refresh"), help="Folder for the export and the training run."),
) -> None:
    """Export → train (the stable version's own job) → evaluate against stable → canary behind the error, latency,
    evaluation and feedback gates."""
    from server.observability.audit import AuditLog
    from server.registry import open_registry

    settings = load_settings()
    if method not in ("sft", "dpo"):
        fail(f"--method {method!r}: sft or dpo")
    registry = open_registry(settings.registry)
    stable = _stable(registry, name)
    run_dir = work / f"{name}-{int(time.time())}"
    rows, pairs, snap = export(settings, stable.manifest["tenant"], name, _since(since), run_dir / "export",
                               since_text=since)
    if rows == 0 or (method == "dpo" and pairs == 0):
        fail(f"{name}: nothing to train on since {since} ({rows} rows, {pairs} preference pairs)")
    version = _train_refresh(settings, stable, _refresh_job(stable, job, method, run_dir), method)
    spec = _rollout_spec(version.version, steps, interval,
                         {"max_down_increase": max_down_increase, "min_feedback": min_feedback,
                          "min_requests": min_requests, "latency_tolerance": latency_tolerance})
    record = _canary(settings, registry, name, spec)
    AuditLog(settings.state_dir, settings.registry).record(actor(), "refresh", name, version.version,
                                                           tenant=stable.manifest["tenant"], snapshot=snap,
                                                           method=method, rows=rows, pairs=pairs)
    typer.echo(f"{version.key} trained on {rows} rows ({pairs} pairs) of snapshot {snap}; canary at "
               f"{record['weight']}% of {name}@stable")


def _stable(registry: "Registry", name: str) -> "Version":
    from server.registry import RegistryError

    try:
        return registry.resolve(f"{name}@stable")
    except RegistryError as e:
        fail(f"{name}@stable: {e}")


def _refresh_job(stable: "Version", job_path: Path | None, method: str, run_dir: Path) -> tuple["Job", Path]:
    """The job that made `stable` (or --job), on the export (beside the job's own data), for `method`; written
    into the run's folder, whose path the new version's manifest records."""
    import yaml

    from server.trainer.job import Job, JobError, load_job

    if job_path is not None:
        try:
            base_job = load_job(job_path)
        except JobError as e:
            fail(str(e))
    elif stable.manifest.get("job") is None:
        fail(f"{stable.key} keeps no training job (it was not trained by `loraplex train`): pass --job JOB.yaml")
    else:
        base_job = Job.model_validate(stable.manifest["job"])
    export_dir = run_dir / "export"
    tree = base_job.model_dump(mode="json")
    tree.update(data=[str(export_dir / "train.jsonl"), *(str(p) for p in base_job.data if Path(p).is_file())],
                output_dir=str(run_dir / "run"), promote="never", method=method,
                pairs=[str(export_dir / "pairs.jsonl")] if method == "dpo" else [],
                start_from=stable.key if method == "dpo" else None)
    job_file = run_dir / "job.yaml"
    job_file.write_text(yaml.safe_dump(tree))
    return Job.model_validate(tree), job_file


def _train_refresh(settings: Settings, stable: "Version", job: tuple["Job", Path], method: str) -> "Version":
    from server.observability.audit import AuditLog
    from server.trainer.train import TrainError, run

    audit_log = AuditLog(settings.state_dir, settings.registry)

    def audit(action: str, *args, **detail) -> None:
        audit_log.record(actor(), action, *args, **detail)

    try:
        return run(job[0], job[1], settings.registry, settings, log=typer.echo, audit=audit, against=stable.key)
    except TrainError as e:
        fail(str(e))


def _rollout_spec(version: int, steps: str, interval: float, bounds: dict) -> "RolloutSpec":
    from pydantic import ValidationError

    from server.rollout.rollouts import RolloutSpec

    try:
        return RolloutSpec(to=version, steps=[float(s) for s in steps.split(",")], interval=interval,
                           require_evaluation=True, **bounds)
    except (ValidationError, ValueError) as e:
        fail(f"--steps/--interval/--max-down-increase: {e}".splitlines()[0])


def _canary(settings: Settings, registry: "Registry", name: str, spec: "RolloutSpec") -> dict:
    """Starts the rollout of the new version on `stable`; the gateways carry it on."""
    from server.observability.audit import AuditLog
    from server.registry import RegistryError
    from server.rollout.rollouts import ROLLOUTS_FILE, Rollouts
    from server.store.documents import shared_document

    rollouts = Rollouts(shared_document(settings.registry, settings.state_dir, ROLLOUTS_FILE), registry,
                        AuditLog(settings.state_dir, settings.registry))
    try:
        return rollouts.start(name, "stable", spec, actor())
    except RegistryError as e:
        fail(f"{name}@{spec.to} registered, but not rolled out: {e}")
