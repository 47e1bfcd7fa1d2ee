"""The commands that act on the registry, the keys and the audit log directly, with no server running."""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from server.cli.conventions import REASON, actor, echo_json, fail, load_settings
from server.core.config import Settings

if TYPE_CHECKING:
    from server.registry import Registry, Version
    from server.weights.recipes import Part


def adapters_add(
    name: str = typer.Argument(..., help="Adapter name."),
    source: str = typer.Argument(..., metavar="PATH|hf://ORG/REPO",
                                 help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors), or a "
                                      "Hugging Face Hub repository (HF_TOKEN used if set)."),
    revision: str = typer.Option(None, help="hf:// only: branch, tag, commit or refs/pr/N (default main), pinned to "
                                            "its commit at registration."),
    subfolder: str = typer.Option(None, help="hf:// only: the adapter's folder in the repository."),
    tenant: str = typer.Option("default", help="Tenant that owns the adapter."),
    public: bool = typer.Option(False, help="Let every tenant use it."),
    reason: str = REASON,
) -> None:
    """Register a PEFT adapter, from a directory or the Hub, as the next version of NAME (no server needed)."""
    from server.registry.hub import SCHEME

    def register(settings: Settings, work: Path) -> "Version":
        from server.registry import check_new_name
        from server.registry.hub import HubSource, fetch

        check_new_name(name)
        if source.startswith(SCHEME):
            files, record = fetch(HubSource.parse(source, revision, subfolder), work, token=None,
                                  max_bytes=settings.max_unpacked_bytes)
            return _registry(settings).register(name, files, **_placing(settings, tenant, public),
                                                origin=f"{SCHEME}{record['repo']}@{record['sha']}",
                                                extra={"hub": record})
        if revision or subfolder:
            fail("--revision and --subfolder: only for an hf:// source")
        if not Path(source).is_dir():
            fail(f"PATH: {source} is not a directory")
        return _registry(settings).register(name, Path(source), **_placing(settings, tenant, public),
                                            origin=f"cli:{Path(source).resolve()}")

    version = _register_audited("add", name, tenant, reason, register)
    hub = version.manifest.get("hub")
    typer.echo(f"registered {version.key} (latest) rank {version.manifest['rank']}"
               + (f" from {source} at commit {hub['sha']}" if hub else ""))


def adapters_compose(
    name: str = typer.Argument(..., help="Name of the composed adapter (its next version)."),
    sources: list[str] = typer.Option(..., "--from", metavar="NAME@VERSION:WEIGHT",
                                      help="A source version and its weight; repeat for each (at most 8)."),
    tenant: str = typer.Option("default", help="Tenant that owns the composed adapter."),
    public: bool = typer.Option(False, help="Let every tenant use it."),
    reason: str = REASON,
) -> None:
    """Register the exact weighted sum of adapters' updates (rank concatenation) as the next version of NAME."""

    def register(settings: Settings, work: Path) -> "Version":
        from server.registry import check_new_name
        from server.weights.recipes import register_composed

        check_new_name(name)
        registry = _registry(settings)
        parts = [_part(registry, text) for text in sources]
        return register_composed(registry, name, parts, **_placing(settings, tenant, public),
                                 origin="compose:" + ",".join(sources))

    version = _register_audited("compose", name, tenant, reason, register)
    typer.echo(f"registered {version.key} (latest) rank {version.manifest['rank']} composed of "
               + " + ".join(f"{r['weight']} {r['name']}@{r['version']}" for r in version.manifest["recipe"]))


def adapters_merge(
    ref: str = typer.Argument(..., metavar="NAME@VERSION", help="The version to merge (an alias works too)."),
    out: Path = typer.Option(..., help="Directory to write the merged model to (new or empty)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    tolerance: float = typer.Option(None, help="Bound on the merged logits' largest difference from base + "
                                               "adapter, relative to their scale (default 1e-4 float32, 2e-2 "
                                               "bfloat16)."),
) -> None:
    """Merge an adapter version into the base model (LORAPLEX_BASE_MODEL): a standalone model directory, written only
    once its logits match base + adapter on probe prompts."""
    from server.core import base_model
    from server.registry import RegistryError
    from server.weights.merge import DEFAULT_TOLERANCE, MergeError, merge

    settings = load_settings()
    if dtype not in DEFAULT_TOLERANCE:
        fail(f"--dtype {dtype!r}: float32 or bfloat16")
    try:
        registry = _registry(settings)
        report = merge(registry, registry.resolve(ref), base_model.local_dir(settings.base_model), out, dtype,
                       tolerance, log=typer.echo)
    except (MergeError, RegistryError) as e:
        fail(str(e))
    except (ImportError, OSError) as e:
        fail(f"merging needs the training extras (torch, transformers, peft) and a readable base model: {e}")
    typer.echo(f"wrote {report.out}: {ref} merged into {settings.base_model} ({report.dtype})")


def _part(registry: "Registry", text: str) -> "Part":
    """NAME[@VERSION|@ALIAS]:WEIGHT as a recipe part; a malformed one ends the command naming it."""
    from server.weights.recipes import Part, check_weight

    ref, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep else None
    except ValueError:
        value = None
    if value is None:
        fail(f"--from {text!r}: expected NAME@VERSION:WEIGHT, a weight such as 0.5")
    return Part(registry.resolve(ref), check_weight(value, f"--from {text}"))


def _registry(settings: Settings) -> "Registry":
    from server.registry import open_registry

    return open_registry(settings.registry)


def _placing(settings: Settings, tenant: str, public: bool) -> dict:
    """The keyword arguments every registration takes: the served base, the rank limit, owner and visibility."""
    from server.core import base_model

    return {"base": base_model.load(settings.base_model), "max_rank": settings.max_lora_rank, "tenant": tenant,
            "public": public}


def _register_audited(action: str, name: str, tenant: str, reason: str | None,
                      register: Callable[[Settings, Path], "Version"]) -> "Version":
    """Runs a registration in a scratch folder and audits it; a refusal ends the command in one line, audited."""
    import shutil
    import tempfile

    from server.core import base_model
    from server.observability.audit import AuditLog
    from server.registry import RegistryError
    from server.registry.hub import HubError
    from server.registry.validation import WEIGHTS_FILE, InvalidAdapter
    from server.weights.compose import ComposeError

    settings = load_settings()
    audit_log = AuditLog(settings.state_dir, settings.registry)
    work = Path(tempfile.mkdtemp(prefix="loraplex-add-"))
    try:
        version = register(settings, work)
    except (InvalidAdapter, RegistryError, base_model.Unreadable, HubError, ComposeError) as e:
        audit_log.record(actor(), action, name, result=f"refused: {e}", tenant=tenant, reason=reason)
        fail(str(e))
    except FileNotFoundError as e:
        fail(f"base model LORAPLEX_BASE_MODEL={settings.base_model}: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    audit_log.record(actor(), action, name, version.version, version.manifest["files"][WEIGHTS_FILE]["sha256"],
                     tenant=tenant, reason=reason)
    return version


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
