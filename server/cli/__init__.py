"""The `loraplex` command line."""

import asyncio
from pathlib import Path

import typer
from pydantic import ValidationError

from server.core.config import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Multi-tenant LoRA serving over vLLM.")
adapters_app = typer.Typer(no_args_is_help=True, help="Manage adapters: `add` locally, the rest on a running server.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys and operator keys (stored hashed).")
registry_app = typer.Typer(no_args_is_help=True, help="Check and copy adapter registries.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.add_typer(registry_app, name="registry")


def _settings_help() -> str:
    lines = ["Settings (environment variables):\n"]
    for name, f in Settings.model_fields.items():
        default = f.default_factory() if f.default_factory else f.default
        shown = ",".join(default) if isinstance(default, list) else ("" if default is None else str(default))
        lines.append(f"LORAPLEX_{name.upper()}  {f.description} Default: '{shown}'.\n")
    return "\n".join(lines)


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        typer.echo(f"error: LORAPLEX_{field.upper()}: {err['msg']}", err=True)
        raise typer.Exit(2)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _check_base_model(settings: Settings) -> None:
    """The gateway reads the model again at start-up; here one it cannot read ends `serve` in one line."""
    from server.core import base_model as basemodel

    try:
        basemodel.load(settings.base_model)
    except basemodel.Unreadable as e:
        fail(str(e))


# Idle client connections stay open longer than clients keep them (httpx and the openai client 5 s, aiohttp 15 s) and
# than load balancers do (60 s): with uvicorn's 5 s, a request sent as the server closes the connection was lost.
KEEP_ALIVE_S = 75


@app.command(epilog=_settings_help())
def serve(
    host: str = typer.Option(None, help="Overrides LORAPLEX_HOST."),
    port: int = typer.Option(None, help="Overrides LORAPLEX_PORT."),
) -> None:
    """Start the gateway (and a local vLLM engine unless LORAPLEX_ENGINE_URLS is set)."""
    import uvicorn

    from server.gateway.app import create_admin_app, create_app
    from server.observability.logs import configure

    settings = load_settings(host=host, port=port)
    _check_base_model(settings)
    configure(settings.log_level)
    app = create_app(settings)
    # The access log is the gateway's own (server/request_ids.py): uvicorn's cannot show the request id.
    main = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                         timeout_graceful_shutdown=30, access_log=False,
                                         timeout_keep_alive=KEEP_ALIVE_S))
    if settings.admin_port is None:
        return main.run()
    admin = uvicorn.Server(uvicorn.Config(create_admin_app(settings, app), host=settings.admin_host or settings.host,
                                          port=settings.admin_port, log_level=settings.log_level, lifespan="off",
                                          access_log=False, timeout_keep_alive=KEEP_ALIVE_S))

    async def both() -> None:
        async def admin_once_started() -> None:
            while not main.started and not main.should_exit:
                await asyncio.sleep(0.05)  # the admin app needs the gateway the main app's startup builds
            if main.started:
                await admin._serve()  # the main server owns the signal handlers and tells this one to stop

        task = asyncio.create_task(admin_once_started())
        try:
            await main.serve()
        finally:
            admin.should_exit = True
            await task

    asyncio.run(both())


@app.command("demo-model")
def demo_model(
    out: Path = typer.Option(Path("models/demo-base"), help="Directory to write the model to."),
    preset: str = typer.Option("demo", help="Model size: demo or bench."),
    seed: int = typer.Option(0, help="Seed for the corpus, tokenizer and weights."),
    steps: int = typer.Option(None, help="Training steps (default: the preset's)."),
) -> None:
    """Build the embedded default base model offline (a small Llama trained briefly on generated text)."""
    from server.trainer.demo_model import PRESETS, build

    if preset not in PRESETS:
        fail(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    build(out, preset=preset, seed=seed, steps=steps, log=typer.echo)
    typer.echo(f"wrote {out}")


@app.command()
def engine(
    port: int = typer.Option(8100, help="Port the engine listens on."),
    host: str = typer.Option("0.0.0.0", help="Interface the engine listens on; it answers only holders of the "
                                             "engine key."),
) -> None:
    """Start a vLLM engine that fetches adapters from LORAPLEX_REGISTRY itself, for gateways on other hosts
    (LORAPLEX_ENGINE_URLS). This process becomes vLLM, so stopping it stops the engine."""
    import os
    from pathlib import Path

    from server.tenancy.keys import ADMIN_TOKEN_FILE, admin_token, engine_key
    from server.engine.process import engine_command, engine_environment

    settings = load_settings()
    if settings.engine_api_key is not None:
        key = settings.engine_api_key.get_secret_value()
    elif settings.admin_token is not None or (settings.state_dir / ADMIN_TOKEN_FILE).is_file():
        key = engine_key(settings, admin_token(settings))
    else:
        fail("LORAPLEX_ENGINE_API_KEY: not set; set it (or LORAPLEX_ADMIN_TOKEN) to what the gateways use, or no "
             "gateway can use this engine")
    base = str(Path(settings.base_model).resolve()) if Path(settings.base_model).exists() else settings.base_model
    command = engine_command(settings, base, port, host)
    os.execvpe(command[0], command, engine_environment(settings, key, port))


@adapters_app.command("add")
def adapters_add(
    name: str = typer.Argument(..., help="Adapter name."),
    path: Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)."),
    tenant: str = typer.Option("default", help="Tenant that owns the adapter."),
    public: bool = typer.Option(False, help="Let every tenant use it."),
    reason: str = typer.Option(None, "--reason", help="Why, for the audit log."),
) -> None:
    """Register a PEFT adapter directory as the next version of NAME (no server needed)."""
    from server.core import base_model as basemodel
    from server.observability.audit import AuditLog
    from server.registry.directory import RegistryError, open_registry
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
        AuditLog(settings.state_dir, settings.registry).record(_actor(), "add", name, result=f"refused: {e}",
                                                               tenant=tenant, reason=reason)
        fail(str(e))
    except FileNotFoundError as e:
        fail(f"base model LORAPLEX_BASE_MODEL={settings.base_model}: {e}")
    AuditLog(settings.state_dir, settings.registry).record(_actor(), "add", name, version.version,
                                                           version.manifest["files"][WEIGHTS_FILE]["sha256"],
                                                           tenant=tenant, reason=reason)
    typer.echo(f"registered {version.key} (latest) rank {version.manifest['rank']} in {settings.registry}")


def _actor() -> str:
    """The CLI's name in the audit log: it acts on the registry directly, as the operating-system user."""
    import getpass
    import socket

    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def _admin(method: str, path: str, url: str | None, token: str | None, **kwargs):
    """One admin API call; a failure ends the command with the server's error message."""
    import httpx

    from server.tenancy.keys import ADMIN_TOKEN_FILE

    settings = load_settings(url=url)
    if token is None and settings.admin_token is not None:
        token = settings.admin_token.get_secret_value()
    if token is None and (settings.state_dir / ADMIN_TOKEN_FILE).exists():
        token = (settings.state_dir / ADMIN_TOKEN_FILE).read_text().strip()
    if token is None:
        fail(f"no admin token: pass --token, set LORAPLEX_ADMIN_TOKEN, or run beside {settings.state_dir}")
    try:
        r = httpx.request(method, settings.server_url + path, headers={"Authorization": f"Bearer {token}"},
                          timeout=600, **kwargs)
    except httpx.TransportError as e:
        fail(f"cannot reach {settings.server_url}: {e}")
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:300]}}
    if r.status_code >= 400:
        fail(f"{r.status_code}: {body.get('error', {}).get('message', body)}")
    return body


def _json_text(data: object) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)


def _echo_json(data: object) -> None:
    typer.echo(_json_text(data))


URL = typer.Option(None, "--url", help="Server URL (LORAPLEX_URL; default http://LORAPLEX_HOST:LORAPLEX_PORT).")
TOKEN = typer.Option(None, "--token", help="Admin token or key (LORAPLEX_ADMIN_TOKEN, else STATE_DIR/admin_token).")
REASON = typer.Option(None, "--reason", help="Why, for the audit log.")


def _why(reason: str | None) -> dict:
    return {"params": {"reason": reason}} if reason else {}


@adapters_app.command("list")
def adapters_list(tenant: str = typer.Option(None, help="Only this tenant's adapters."),
                  url: str = URL, token: str = TOKEN) -> None:
    """List the server's adapters with versions and aliases."""
    _echo_json(_admin("GET", "/admin/adapters", url, token, params={"tenant": tenant} if tenant else None)["data"])


@adapters_app.command("show")
def adapters_show(name: str, url: str = URL, token: str = TOKEN) -> None:
    """Show one adapter: every version's manifest and its aliases."""
    _echo_json(_admin("GET", f"/admin/adapters/{name}", url, token))


@adapters_app.command("upload")
def adapters_upload(
    name: str,
    path: Path = typer.Argument(..., help="A PEFT adapter directory, or a .tar.gz/.tgz/.zip of one."),
    tenant: str = typer.Option(None, help="Tenant that owns the adapter (a tenant-admin key's own by default)."),
    alias: str = typer.Option(None, help="Also point this alias at the new version."),
    public: bool = typer.Option(False, help="Let every tenant use it."),
    eval_data: Path = typer.Option(None, "--eval", help="JSONL held-out rows: evaluate the version on arrival."),
    general_text: Path = typer.Option(None, "--general", help="Plain text for the forgetting measure."),
    promote: str = typer.Option("never", help='"auto": point stable at the version if its evaluation passes.'),
    max_forgetting: float = typer.Option(0.05, help="Allowed relative rise of general-text perplexity."),
    reason: str = REASON, url: str = URL, token: str = TOKEN,
) -> None:
    """Upload an adapter to a running server as the next version of NAME."""
    from server.registry.archive import pack_archive

    if path.is_dir():
        content, filename = pack_archive(path), f"{name}.tar.gz"
    elif path.is_file():
        content, filename = path.read_bytes(), path.name
    else:
        fail(f"PATH: {path} does not exist")
    form = {"name": name, "public": str(public).lower(), "promote": promote, "max_forgetting": str(max_forgetting),
            **({"alias": alias} if alias else {}), **({"tenant": tenant} if tenant else {})}
    files = {"file": (filename, content), **_file_part("eval_data", eval_data, "--eval"),
             **_file_part("general_text", general_text, "--general")}
    answer = _admin("POST", "/admin/adapters", url, token, data=form, files=files, **_why(reason))
    evaluation = answer.pop("evaluation", None)
    _echo_json(answer)
    if evaluation:
        typer.echo(evaluation["table"])


def _file_part(field: str, path: Path | None, option: str) -> dict:
    if path is None:
        return {}
    if not path.is_file():
        fail(f"{option}: {path} does not exist")
    return {field: (path.name, path.read_bytes())}


@app.command("eval")
def eval_version(
    ref: str = typer.Argument(..., metavar="NAME@VERSION", help="The version to score."),
    data: Path = typer.Option(..., "--data", help="JSONL held-out rows (chat, prompt/completion or Alpaca)."),
    against: str = typer.Option("base", help='"base", an alias (stable) or a version number of NAME.'),
    general_text: Path = typer.Option(None, "--general", help="Plain text for the forgetting measure."),
    max_seq_len: int = typer.Option(512, help="Tokens of an example or text window scored."),
    generations: int = typer.Option(32, help="Held-out rows answered greedily for exact match and ROUGE-L."),
    max_new_tokens: int = typer.Option(64),
    max_forgetting: float = typer.Option(0.05, help="Allowed relative rise of general-text perplexity."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
    reason: str = REASON, url: str = URL, token: str = TOKEN,
) -> None:
    """Score a version through the serving engine against the base or another version; the result is kept beside
    the version, where rollouts read it."""
    from server.registry.directory import VERSION_RE
    from server.trainer.data import DataError, read_rows

    name, _, version = ref.partition("@")
    if not VERSION_RE.fullmatch(version):
        fail(f"NAME@VERSION: {ref!r} needs a version number, as in acme-support@3")
    try:
        examples, _ = read_rows([data])
    except DataError as e:
        fail(str(e))
    rows = [{"messages": e.conversation()} for e in examples]
    if general_text is not None and not general_text.is_file():
        fail(f"--general: {general_text} does not exist")
    body = {"rows": rows, "against": against, "max_seq_len": max_seq_len, "generations": generations,
            "max_new_tokens": max_new_tokens, "max_forgetting": max_forgetting,
            "general_text": general_text.read_text() if general_text else None}
    result = _admin("POST", f"/admin/adapters/{name}/versions/{version}/eval", url, token, json=body, **_why(reason))
    typer.echo(_json_text(result) if as_json else result["table"])
    if not result["passed"]:
        raise typer.Exit(1)


@adapters_app.command("alias")
def adapters_alias(name: str, alias: str, version: int, reason: str = REASON, url: str = URL,
                   token: str = TOKEN) -> None:
    """Point ALIAS of NAME at VERSION."""
    _echo_json(_admin("PUT", f"/admin/adapters/{name}/aliases/{alias}", url, token, json={"version": version},
                      **_why(reason)))


@adapters_app.command("canary")
def adapters_canary(name: str, version: int = typer.Option(..., help="Candidate version."),
                    weight: float = typer.Option(..., help="Percent of the alias's callers sent to it."),
                    alias: str = typer.Option("stable", help="Alias whose callers are split."),
                    reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Send WEIGHT% of ALIAS's callers (the same ones while the weight stays) to VERSION."""
    _echo_json(_admin("PUT", f"/admin/adapters/{name}/aliases/{alias}/canary", url, token,
                      json={"version": version, "weight": weight}, **_why(reason)))


@adapters_app.command("rollout")
def adapters_rollout(
    name: str,
    to: int = typer.Option(..., "--to", help="Candidate version."),
    steps: str = typer.Option("5,25,50,100", help="Percent of the alias's callers at each step; 100 promotes."),
    interval: str = typer.Option("10m", help="How long each step lasts if its bounds hold: 90s, 10m, 1h."),
    alias: str = typer.Option("stable", help="Alias whose callers move to the candidate."),
    min_requests: int = typer.Option(20, help="Requests each side needs in a step before any decision."),
    max_error_increase: float = typer.Option(0.02, help="Error ratio the candidate may add to the stable one's."),
    latency_tolerance: float = typer.Option(0.25, help="Fraction by which the candidate's p95 may exceed it."),
    require_evaluation: bool = typer.Option(False, help="Refuse a candidate without a passing `loraplex eval`."),
    reason: str = REASON, url: str = URL, token: str = TOKEN,
) -> None:
    """Roll VERSION out step by step; any step outside the bounds, or a failed evaluation, rolls it back at once."""
    from server.observability.audit import duration

    seconds = duration(interval)
    if seconds is None:
        fail(f"--interval: {interval!r} is not a duration such as 90s, 10m or 1h")
    try:
        weights = [float(w) for w in steps.split(",")]
    except ValueError:
        fail(f"--steps: {steps!r} is not a list of percentages such as 5,25,50,100")
    body = {"to": to, "steps": weights, "interval": seconds, "min_requests": min_requests,
            "max_error_increase": max_error_increase, "latency_tolerance": latency_tolerance,
            "require_evaluation": require_evaluation}
    _echo_json(_admin("POST", f"/admin/adapters/{name}/aliases/{alias}/rollout", url, token, json=body,
                      **_why(reason)))


@adapters_app.command("shadow")
def adapters_shadow(
    name: str,
    version: int = typer.Option(None, help="Version that gets the copies."),
    percent: float = typer.Option(None, help="Percent of the alias's non-streamed requests copied to it."),
    alias: str = typer.Option("stable", help="Alias whose requests are copied."),
    off: bool = typer.Option(False, "--off", help="Stop copying."),
    reason: str = REASON, url: str = URL, token: str = TOKEN,
) -> None:
    """Copy PERCENT% of ALIAS's requests to VERSION, whose answers are compared with the served ones, not served."""
    path = f"/admin/adapters/{name}/aliases/{alias}/shadow"
    if off:
        _echo_json(_admin("DELETE", path, url, token, **_why(reason)))
        return
    if version is None or percent is None:
        fail("--version and --percent: both needed (or --off)")
    _echo_json(_admin("PUT", path, url, token, json={"version": version, "percent": percent}, **_why(reason)))


@adapters_app.command("promote")
def adapters_promote(name: str, alias: str = typer.Option("stable", help="Alias under a canary."),
                     reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Point ALIAS at its canary's version, for every caller."""
    _echo_json(_admin("POST", f"/admin/adapters/{name}/aliases/{alias}/promote", url, token, **_why(reason)))


@adapters_app.command("abort")
def adapters_abort(name: str, alias: str = typer.Option("stable", help="Alias under a canary."),
                   reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """End ALIAS's canary: every caller gets the version the alias points at."""
    _echo_json(_admin("POST", f"/admin/adapters/{name}/aliases/{alias}/abort", url, token, **_why(reason)))


@adapters_app.command("rollback")
def adapters_rollback(name: str, alias: str = typer.Option("stable", help="Alias to move back."),
                      reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Move ALIAS (stable) back to the version it pointed to before."""
    _echo_json(_admin("POST", f"/admin/adapters/{name}/rollback", url, token, json={"alias": alias},
                      **_why(reason)))


@adapters_app.command("delete")
def adapters_delete(name: str, version: int = typer.Option(None, help="Delete only this version."),
                    reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Delete an adapter (or one version); requests already running on it finish."""
    path = f"/admin/adapters/{name}" + (f"/versions/{version}" if version is not None else "")
    _echo_json(_admin("DELETE", path, url, token, **_why(reason)))


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(None, help="Tenant the key acts for (not for --admin)."),
    role: str = typer.Option("inference", help="inference (/v1) or tenant-admin (also /admin, own tenant only)."),
    admin: bool = typer.Option(False, "--admin", help="An operator key: /admin for every tenant; needs --name."),
    name: str = typer.Option(None, help="The key's name in the audit log (required with --admin)."),
    reason: str = REASON,
) -> None:
    """Create an API key; the key is printed once, as the last word."""
    from server.observability.audit import AuditLog
    from server.tenancy.keys import key_store
    from server.registry.directory import InvalidReference, check_name

    settings = load_settings()
    try:
        if tenant is not None:
            check_name(tenant, "tenant")
        key_id, key = key_store(settings).create(tenant, "admin" if admin else role, name)
    except (InvalidReference, ValueError) as e:
        fail(f"--{e}")
    AuditLog(settings.state_dir, settings.registry).record(_actor(), "key_create", tenant=tenant, key_id=key_id,
                                                           role="admin" if admin else role, name=name, reason=reason)
    who = f"operator {name}" if admin else f"tenant {tenant} ({role})"
    typer.echo(f"created {key_id} for {who}; store this key now, it is not shown again: {key}")


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (id, tenant, role, name, creation time; never the keys)."""
    from server.tenancy.keys import key_store

    _echo_json(key_store(load_settings()).list())


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., metavar="KEY_ID_OR_NAME"), reason: str = REASON) -> None:
    """Revoke an API key by id (or an operator key by name); running servers refuse it from their next request."""
    from server.observability.audit import AuditLog
    from server.tenancy.keys import key_store

    settings = load_settings()
    key_id = key_store(settings).revoke(key)
    if key_id is None:
        fail(f"KEY_ID_OR_NAME: no key {key!r}")
    AuditLog(settings.state_dir, settings.registry).record(_actor(), "key_revoke", key_id=key_id, reason=reason)
    typer.echo(f"revoked {key_id}")


@app.command()
def audit(
    tenant: str = typer.Option(None, help="Only entries about this tenant's adapters and keys."),
    since: str = typer.Option(None, help="Only entries since: an ISO 8601 time (UTC unless it says) or an age "
                                         "such as 30m, 12h, 7d."),
) -> None:
    """Print the audit log, every gateway's and CLI's entries merged oldest first, one JSON object a line."""
    import json

    from server.observability.audit import AuditLog, parse_since

    settings = load_settings()
    try:
        start = parse_since(since) if since else None
    except ValueError as e:
        fail(f"--since: {e}")
    for entry in AuditLog(settings.state_dir, settings.registry).entries():
        if (tenant is None or entry.get("tenant") == tenant) and (start is None or entry["time"] >= start):
            typer.echo(json.dumps(entry, sort_keys=True))


@keys_app.command("engine")
def keys_engine() -> None:
    """Print the credential engines demand of gateways: give it to engines you start yourself as VLLM_API_KEY."""
    from server.tenancy.keys import admin_token, engine_key

    settings = load_settings()
    typer.echo(engine_key(settings, admin_token(settings)))


@registry_app.command("check")
def registry_check(
    location: str = typer.Argument(None, help="Registry directory or s3://BUCKET/PREFIX (default LORAPLEX_REGISTRY)."),
) -> None:
    """Verify every version's manifest and file hashes; exit 1 if any is damaged."""
    from server.registry.directory import open_registry

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


@registry_app.command("copy")
def registry_copy(
    source: str = typer.Argument(..., help="Registry to copy: a directory or s3://BUCKET/PREFIX."),
    dest: str = typer.Argument(..., help="Registry to copy into: a directory or s3://BUCKET/PREFIX."),
) -> None:
    """Copy every version, alias and owner of one registry into another, keeping version numbers; then check it."""
    from server.observability.audit import AuditLog
    from server.registry.directory import RegistryError, open_registry
    from server.registry.copy import copy_registry

    audit_log = AuditLog(load_settings().state_dir, dest)
    try:
        copied, skipped = copy_registry(open_registry(source), open_registry(dest), log=typer.echo)
    except (RegistryError, OSError) as e:
        audit_log.record(_actor(), "registry_copy", result=f"refused: {e}", source=source, dest=dest)
        fail(str(e))
    audit_log.record(_actor(), "registry_copy", source=source, dest=dest, copied=copied, skipped=skipped)
    typer.echo(f"copied {copied} versions ({skipped} already there) from {source} to {dest}")
    registry_check(dest)


@app.command()
def train(
    job_file: Path = typer.Argument(..., metavar="JOB.yaml", help="Training job file."),
    set_: list[str] = typer.Option([], "--set", help="Override a job key: --set lora.r=8 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the job's last checkpoint."),
    registry: str = typer.Option(None, help="Registry to register into: a directory or s3://BUCKET/PREFIX "
                                            "(default LORAPLEX_REGISTRY)."),
) -> None:
    """Train a QLoRA adapter, evaluate it against the base, and register it as the next version."""
    from server.trainer.data import DataError
    from server.trainer.job import JobError, load_job
    from server.trainer.train import TrainError, run

    from server.observability.audit import AuditLog

    settings = load_settings()
    audit_log = AuditLog(settings.state_dir, registry or settings.registry)
    try:
        job = load_job(job_file, set_)
        run(job, job_file.resolve(), registry or settings.registry, settings, resume=resume,
            log=typer.echo, audit=lambda *args, **detail: audit_log.record(_actor(), *args, **detail))
    except (JobError, DataError, TrainError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: nothing was registered; run again with --resume to continue from the last checkpoint")


def main() -> None:
    app()


