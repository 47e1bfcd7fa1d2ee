"""What every `loraplex` command does the same way: read settings, fail, print JSON, sign the audit log."""

import typer
from pydantic import ValidationError

from server.core.config import Settings

REASON = typer.Option(None, "--reason", help="Why, for the audit log.")


def settings_help() -> str:
    """The epilog listing every LORAPLEX_ environment variable with its description and default."""
    lines = ["Settings (environment variables):\n"]
    for name, f in Settings.model_fields.items():
        default = f.default_factory() if f.default_factory else f.default
        shown = ",".join(default) if isinstance(default, list) else ("" if default is None else str(default))
        lines.append(f"LORAPLEX_{name.upper()}  {f.description} Default: '{shown}'.\n")
    return "\n".join(lines)


def load_settings(**overrides) -> Settings:
    """The settings from the environment, with the options given; an invalid one ends the command (exit 2)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        typer.echo(f"error: LORAPLEX_{field.upper()}: {err['msg']}", err=True)
        raise typer.Exit(2)


def fail(message: str) -> None:
    """End the command with one line on stderr (exit 1)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def json_text(data: object) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)


def echo_json(data: object) -> None:
    typer.echo(json_text(data))


def actor() -> str:
    """The CLI's name in the audit log: it acts on the registry directly, as the operating-system user."""
    import getpass
    import socket

    return f"cli:{getpass.getuser()}@{socket.gethostname()}"
