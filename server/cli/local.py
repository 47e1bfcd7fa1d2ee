"""The commands that act on the registry, the keys and the audit log directly, with no server running."""

from pathlib import Path

import typer

from server.cli.conventions import REASON, actor, echo_json, fail, load_settings


def adapters_add(
    name: str = typer.Argument(..., help="Adapter name."),
    path: Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)."),
    tenant: str = typer.Option("default", help="Tenant that owns the adapter."),
    public: bool = typer.Option(False, help="Let every tenant use it."),
    reason: str = REASON,
) -> None:
    """Register a PEFT adapter directory as the next version of NAME (no server needed)."""
    from server.core import base_model as basemodel
    from server.observability.audit import AuditLog
    from server.registry import RegistryError, open_registry
    from server.registry.validation import WEIGHTS_FILE, InvalidAdapter

    settings = load_settings()
    if not path.is_dir():
        fail(f"PATH: {path} is not a directory")
    try:
        base = basemodel.load(settings.base_model)
        version = open_registry(settings.registry).register(
            name, path, base=base, max_rank=settings.max_lora_rank,
            tenant=tenant, public=public, origin=f"cli:{path.resolve()}",
        )
    except (InvalidAdapter, RegistryError, basemodel.Unreadable) as e:
        AuditLog(settings.state_dir, settings.registry).record(actor(), "add", name, result=f"refused: {e}",
                                                               tenant=tenant, reason=reason)
        fail(str(e))
    except FileNotFoundError as e:
        fail(f"base model LORAPLEX_BASE_MODEL={settings.base_model}: {e}")
    AuditLog(settings.state_dir, settings.registry).record(actor(), "add", name, version.version,
                                                           version.manifest["files"][WEIGHTS_FILE]["sha256"],
                                                           tenant=tenant, reason=reason)
    typer.echo(f"registered {version.key} (latest) rank {version.manifest['rank']} in {settings.registry}")


def keys_create(
    tenant: str = typer.Option(None, help="Tenant the key acts for (not for --admin)."),
    role: str = typer.Option("inference", help="inference (/v1) or tenant-admin (also /admin, own tenant only)."),
    admin: bool = typer.Option(False, "--admin", help="An operator key: /admin for every tenant; needs --name."),
    name: str = typer.Option(None, help="The key's name in the audit log (required with --admin)."),
    reason: str = REASON,
) -> None:
    """Create an API key; the key is printed once, as the last word."""
    from server.observability.audit import AuditLog
    from server.registry import InvalidReference, check_name
    from server.tenancy.keys import key_store

    settings = load_settings()
    try:
        if tenant is not None:
            check_name(tenant, "tenant")
        key_id, key = key_store(settings).create(tenant, "admin" if admin else role, name)
    except (InvalidReference, ValueError) as e:
        fail(f"--{e}")
    AuditLog(settings.state_dir, settings.registry).record(actor(), "key_create", tenant=tenant, key_id=key_id,
                                                           role="admin" if admin else role, name=name, reason=reason)
    who = f"operator {name}" if admin else f"tenant {tenant} ({role})"
    typer.echo(f"created {key_id} for {who}; store this key now, it is not shown again: {key}")


def keys_list() -> None:
    """List API keys (id, tenant, role, name, creation time; never the keys)."""
    from server.tenancy.keys import key_store

    echo_json(key_store(load_settings()).list())


def keys_revoke(key: str = typer.Argument(..., metavar="KEY_ID_OR_NAME"), reason: str = REASON) -> None:
    """Revoke an API key by id (or an operator key by name); running servers refuse it from their next request."""
    from server.observability.audit import AuditLog
    from server.tenancy.keys import key_store

    settings = load_settings()
    key_id = key_store(settings).revoke(key)
    if key_id is None:
        fail(f"KEY_ID_OR_NAME: no key {key!r}")
    AuditLog(settings.state_dir, settings.registry).record(actor(), "key_revoke", key_id=key_id, reason=reason)
    typer.echo(f"revoked {key_id}")


def keys_engine() -> None:
    """Print the credential engines demand of gateways: give it to engines you start yourself as VLLM_API_KEY."""
    from server.tenancy.keys import admin_token, engine_key

    settings = load_settings()
    typer.echo(engine_key(settings, admin_token(settings)))


def audit(
    tenant: str = typer.Option(None, help="Only entries about this tenant's adapters and keys."),
    since: str = typer.Option(None, help="Only entries since: an ISO 8601 time (UTC unless it says) or an age "
                                         "such as 30m, 12h, 7d."),
) -> None:
    """Print the audit log, every gateway's and CLI's entries merged oldest first, one JSON object a line."""
    import json

    from server.core.durations import parse_since
    from server.observability.audit import AuditLog

    settings = load_settings()
    try:
        start = parse_since(since) if since else None
    except ValueError as e:
        fail(f"--since: {e}")
    for entry in AuditLog(settings.state_dir, settings.registry).entries():
        if (tenant is None or entry.get("tenant") == tenant) and (start is None or entry["time"] >= start):
            typer.echo(json.dumps(entry, sort_keys=True))


def registry_check(
    location: str = typer.Argument(None, help="Registry directory or s3://BUCKET/PREFIX (default LORAPLEX_REGISTRY)."),
) -> None:
    """Verify every version's manifest and file hashes; exit 1 if any is damaged."""
    from server.registry import open_registry

    reg = open_registry(location or load_settings().registry)
    problems, notes = reg.check()
    for note in notes:
        typer.echo(f"note: {note}")
    for problem in problems:
        typer.echo(f"problem: {problem}")
    versions = sum(len(reg.versions(n)) for n in reg.names())
    typer.echo(f"{'FAILED' if problems else 'ok'}: {versions} versions of {len(reg.names())} adapters checked, "
               f"{len(problems)} problems")
    if problems:
        raise typer.Exit(1)


def registry_copy(
    source: str = typer.Argument(..., help="Registry to copy: a directory or s3://BUCKET/PREFIX."),
    dest: str = typer.Argument(..., help="Registry to copy into: a directory or s3://BUCKET/PREFIX."),
) -> None:
    """Copy every version, alias and owner of one registry into another, keeping version numbers; then check it."""
    from server.observability.audit import AuditLog
    from server.registry import RegistryError, open_registry
    from server.registry.copy import copy_registry

    audit_log = AuditLog(load_settings().state_dir, dest)
    try:
        copied, skipped = copy_registry(open_registry(source), open_registry(dest), log=typer.echo)
    except (RegistryError, OSError) as e:
        audit_log.record(actor(), "registry_copy", result=f"refused: {e}", source=source, dest=dest)
        fail(str(e))
    audit_log.record(actor(), "registry_copy", source=source, dest=dest, copied=copied, skipped=skipped)
    typer.echo(f"copied {copied} versions ({skipped} already there) from {source} to {dest}")
    registry_check(dest)
