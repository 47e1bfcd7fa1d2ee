"""The commands that call a running server's /admin API: every `adapters` command but `add`, and `eval`."""

from pathlib import Path

import typer

from server.cli.conventions import REASON, echo_json, fail, json_text, load_settings

URL = typer.Option(None, "--url", help="Server URL (LORAPLEX_URL; default http://LORAPLEX_HOST:LORAPLEX_PORT).")
TOKEN = typer.Option(None, "--token", help="Admin token or key (LORAPLEX_ADMIN_TOKEN, else STATE_DIR/admin_token).")


def _admin(method: str, path: str, url: str | None, token: str | None, headers: dict | None = None,
           **kwargs) -> dict:
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
        r = httpx.request(method, settings.server_url + path,
                          headers={"Authorization": f"Bearer {token}", **(headers or {})}, timeout=600, **kwargs)
    except httpx.TransportError as e:
        fail(f"cannot reach {settings.server_url}: {e}")
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:300]}}
    if r.status_code >= 400:
        fail(f"{r.status_code}: {body.get('error', {}).get('message', body)}")
    return body


def _why(reason: str | None) -> dict:
    """The query parameter that carries --reason to the server's audit log."""
    return {"params": {"reason": reason}} if reason else {}


def adapters_list(tenant: str = typer.Option(None, help="Only this tenant's adapters."),
                  url: str = URL, token: str = TOKEN) -> None:
    """List the server's adapters with versions and aliases."""
    echo_json(_admin("GET", "/admin/adapters", url, token, params={"tenant": tenant} if tenant else None)["data"])


def adapters_show(name: str, url: str = URL, token: str = TOKEN) -> None:
    """Show one adapter: every version's manifest and its aliases."""
    echo_json(_admin("GET", f"/admin/adapters/{name}", url, token))


def adapters_upload(
    name: str,
    path: str = typer.Argument(..., metavar="PATH|hf://ORG/REPO",
                               help="A PEFT adapter directory, a .tar.gz/.tgz/.zip of one, or a Hugging Face Hub "
                                    "repository the server fetches (with HF_TOKEN, if set, sent for this fetch only)."),
    revision: str = typer.Option(None, help="hf:// only: branch, tag, commit or refs/pr/N (default main)."),
    subfolder: str = typer.Option(None, help="hf:// only: the adapter's folder in the repository."),
    send_hf_token: bool = typer.Option(False, "--send-hf-token", help="hf:// only: send HF_TOKEN for the server "
                                                                      "to fetch with (for private repositories)."),
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
    import os

    form = {"name": name, "public": str(public).lower(), "promote": promote, "max_forgetting": str(max_forgetting),
            **({"alias": alias} if alias else {}), **({"tenant": tenant} if tenant else {})}
    files = {**_file_part("eval_data", eval_data, "--eval"), **_file_part("general_text", general_text, "--general")}
    headers = {}
    if path.startswith("hf://"):
        form.update(source=path, **({"revision": revision} if revision else {}),
                    **({"subfolder": subfolder} if subfolder else {}))
        if send_hf_token and not os.environ.get("HF_TOKEN"):
            fail("--send-hf-token: HF_TOKEN is not set")
        headers = {"X-Hub-Token": os.environ["HF_TOKEN"]} if send_hf_token else {}
    elif revision or subfolder or send_hf_token:
        fail("--revision, --subfolder and --send-hf-token: only for an hf:// source")
    else:
        files["file"] = _archive(Path(path), name)
    answer = _admin("POST", "/admin/adapters", url, token, data=form, files=files, headers=headers, **_why(reason))
    evaluation = answer.pop("evaluation", None)
    echo_json(answer)
    if evaluation:
        typer.echo(evaluation["table"])


def _archive(path: Path, name: str) -> tuple[str, bytes]:
    """The multipart file of an adapter directory (packed) or archive."""
    from server.registry.archive import pack_archive

    if path.is_dir():
        return f"{name}.tar.gz", pack_archive(path)
    if path.is_file():
        return path.name, path.read_bytes()
    fail(f"PATH: {path} does not exist")


def _file_part(field: str, path: Path | None, option: str) -> dict:
    """The multipart file field for an optional file option; one that does not exist ends the command."""
    if path is None:
        return {}
    if not path.is_file():
        fail(f"{option}: {path} does not exist")
    return {field: (path.name, path.read_bytes())}


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
    from server.registry import VERSION_RE
    from server.core.examples import DataError, read_rows

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
    typer.echo(json_text(result) if as_json else result["table"])
    if not result["passed"]:
        raise typer.Exit(1)


def adapters_alias(name: str, alias: str, version: int, reason: str = REASON, url: str = URL,
                   token: str = TOKEN) -> None:
    """Point ALIAS of NAME at VERSION."""
    echo_json(_admin("PUT", f"/admin/adapters/{name}/aliases/{alias}", url, token, json={"version": version},
                     **_why(reason)))


def adapters_canary(name: str, version: int = typer.Option(..., help="Candidate version."),
                    weight: float = typer.Option(..., help="Percent of the alias's callers sent to it."),
                    alias: str = typer.Option("stable", help="Alias whose callers are split."),
                    reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Send WEIGHT% of ALIAS's callers (the same ones while the weight stays) to VERSION."""
    echo_json(_admin("PUT", f"/admin/adapters/{name}/aliases/{alias}/canary", url, token,
                     json={"version": version, "weight": weight}, **_why(reason)))


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
    from server.core.durations import duration

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
    echo_json(_admin("POST", f"/admin/adapters/{name}/aliases/{alias}/rollout", url, token, json=body,
                     **_why(reason)))


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
        echo_json(_admin("DELETE", path, url, token, **_why(reason)))
        return
    if version is None or percent is None:
        fail("--version and --percent: both needed (or --off)")
    echo_json(_admin("PUT", path, url, token, json={"version": version, "percent": percent}, **_why(reason)))


def adapters_promote(name: str, alias: str = typer.Option("stable", help="Alias under a canary."),
                     reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Point ALIAS at its canary's version, for every caller."""
    echo_json(_admin("POST", f"/admin/adapters/{name}/aliases/{alias}/promote", url, token, **_why(reason)))


def adapters_abort(name: str, alias: str = typer.Option("stable", help="Alias under a canary."),
                   reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """End ALIAS's canary: every caller gets the version the alias points at."""
    echo_json(_admin("POST", f"/admin/adapters/{name}/aliases/{alias}/abort", url, token, **_why(reason)))


def adapters_rollback(name: str, alias: str = typer.Option("stable", help="Alias to move back."),
                      reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Move ALIAS (stable) back to the version it pointed to before."""
    echo_json(_admin("POST", f"/admin/adapters/{name}/rollback", url, token, json={"alias": alias},
                     **_why(reason)))


def adapters_delete(name: str, version: int = typer.Option(None, help="Delete only this version."),
                    reason: str = REASON, url: str = URL, token: str = TOKEN) -> None:
    """Delete an adapter (or one version); requests already running on it finish."""
    path = f"/admin/adapters/{name}" + (f"/versions/{version}" if version is not None else "")
    echo_json(_admin("DELETE", path, url, token, **_why(reason)))

