"""The `loraplex` command line."""

import logging
from pathlib import Path

import typer
from pydantic import ValidationError

from .config import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Multi-tenant LoRA serving over vLLM.")
adapters_app = typer.Typer(no_args_is_help=True, help="Manage adapters in the local registry.")
app.add_typer(adapters_app, name="adapters")


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


@app.command(epilog=_settings_help())
def serve(
    host: str = typer.Option(None, help="Overrides LORAPLEX_HOST."),
    port: int = typer.Option(None, help="Overrides LORAPLEX_PORT."),
) -> None:
    """Start the gateway (and a local vLLM engine unless LORAPLEX_ENGINE_URLS is set)."""
    import uvicorn

    from .app import create_app

    settings = load_settings(host=host, port=port)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call otherwise
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)


@app.command("demo-model")
def demo_model(
    out: Path = typer.Option(Path("models/demo-base"), help="Directory to write the model to."),
    preset: str = typer.Option("demo", help="Model size: demo or bench."),
    seed: int = typer.Option(0, help="Seed for the corpus, tokenizer and weights."),
    steps: int = typer.Option(None, help="Training steps (default: the preset's)."),
) -> None:
    """Build the embedded default base model offline (a small Llama trained briefly on generated text)."""
    from .demo_model import PRESETS, build

    if preset not in PRESETS:
        fail(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    build(out, preset=preset, seed=seed, steps=steps, log=typer.echo)
    typer.echo(f"wrote {out}")


@adapters_app.command("add")
def adapters_add(
    name: str = typer.Argument(..., help="Adapter name."),
    path: Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)."),
    tenant: str = typer.Option("default", help="Tenant that owns the adapter."),
    public: bool = typer.Option(False, help="Let every tenant use it."),
) -> None:
    """Register a PEFT adapter directory as the next version of NAME (no server needed)."""
    from . import basemodel
    from .registry import Registry, RegistryError
    from .validation import InvalidAdapter

    settings = load_settings()
    if not path.is_dir():
        fail(f"PATH: {path} is not a directory")
    try:
        base = basemodel.load(settings.base_model)
        version = Registry(settings.registry).register(
            name, path, base=base, base_model=settings.base_model, max_rank=settings.max_lora_rank,
            tenant=tenant, public=public, origin=f"cli:{path.resolve()}",
        )
    except (InvalidAdapter, RegistryError) as e:
        fail(str(e))
    except FileNotFoundError as e:
        fail(f"base model LORAPLEX_BASE_MODEL={settings.base_model}: {e}")
    typer.echo(f"registered {version.key} (latest) rank {version.manifest['rank']} at {version.path}")


def main() -> None:
    app()
if __name__ == "__main__":
    main()
