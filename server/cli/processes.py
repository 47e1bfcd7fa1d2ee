"""The commands that run a process: the gateway, a vLLM engine, a training job, the demo model's build."""

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from server.cli.conventions import actor, fail, load_settings
from server.core.config import Settings

if TYPE_CHECKING:
    import uvicorn

# Idle client connections stay open longer than clients keep them (httpx and the openai client 5 s, aiohttp 15 s) and
# than load balancers do (60 s): with uvicorn's 5 s, a request sent as the server closes the connection was lost.
KEEP_ALIVE_S = 75


def _check_base_model(settings: Settings) -> None:
    """The gateway reads the model again at start-up; here one it cannot read ends `serve` in one line."""
    from server.core import base_model as basemodel

    try:
        basemodel.load(settings.base_model)
    except basemodel.Unreadable as e:
        fail(str(e))


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
    # The access log is the gateway's own (server/observability/request_ids.py): uvicorn's cannot show the request id.
    main = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                         timeout_graceful_shutdown=30, access_log=False,
                                         timeout_keep_alive=KEEP_ALIVE_S))
    if settings.admin_port is None:
        return main.run()
    admin = uvicorn.Server(uvicorn.Config(create_admin_app(settings, app), host=settings.admin_host or settings.host,
                                          port=settings.admin_port, log_level=settings.log_level, lifespan="off",
                                          access_log=False, timeout_keep_alive=KEEP_ALIVE_S))
    asyncio.run(_serve_both(main, admin))


async def _serve_both(main: "uvicorn.Server", admin: "uvicorn.Server") -> None:
    """Run the main server and, once it has started, the admin server beside it; both stop with the main one."""
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


def engine(
    port: int = typer.Option(8100, help="Port the engine listens on."),
    host: str = typer.Option("0.0.0.0", help="Interface the engine listens on; it answers only holders of the "
                                             "engine key."),
) -> None:
    """Start a vLLM engine that fetches adapters from LORAPLEX_REGISTRY itself, for gateways on other hosts
    (LORAPLEX_ENGINE_URLS). This process becomes vLLM, so stopping it stops the engine."""
    import os

    from server.engine.process import engine_command, engine_environment
    from server.tenancy.keys import ADMIN_TOKEN_FILE, admin_token, engine_key

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


def train(
    job_file: Path = typer.Argument(..., metavar="JOB.yaml", help="Training job file."),
    set_: list[str] = typer.Option([], "--set", help="Override a job key: --set lora.r=8 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the job's last checkpoint."),
    registry: str = typer.Option(None, help="Registry to register into: a directory or s3://BUCKET/PREFIX "
                                            "(default LORAPLEX_REGISTRY)."),
) -> None:
    """Train a QLoRA adapter, evaluate it against the base, and register it as the next version."""
    from server.observability.audit import AuditLog
    from server.core.examples import DataError
    from server.trainer.job import JobError, load_job
    from server.trainer.train import TrainError, run

    settings = load_settings()
    audit_log = AuditLog(settings.state_dir, registry or settings.registry)
    try:
        job = load_job(job_file, set_)
        run(job, job_file.resolve(), registry or settings.registry, settings, resume=resume,
            log=typer.echo, audit=lambda *args, **detail: audit_log.record(actor(), *args, **detail))
    except (JobError, DataError, TrainError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: nothing was registered; run again with --resume to continue from the last checkpoint")
