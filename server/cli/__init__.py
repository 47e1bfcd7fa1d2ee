"""The `loraplex` command line: its command tree, whose commands live in processes, local and remote."""

import typer

from server.cli import data, local, processes, remote
from server.cli.conventions import settings_help

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Multi-tenant LoRA serving over vLLM.")
adapters_app = typer.Typer(no_args_is_help=True, help="Manage adapters: `add` locally, the rest on a running server.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys and operator keys (stored hashed).")
registry_app = typer.Typer(no_args_is_help=True, help="Check and copy adapter registries.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants' data policies.")
data_app = typer.Typer(no_args_is_help=True, help="Stored completions: exports for training.")
app.add_typer(registry_app, name="registry")
app.add_typer(tenants_app, name="tenants")
app.add_typer(data_app, name="data")

# Registered in the order `--help` lists them.
app.command("serve", epilog=settings_help())(processes.serve)
app.command("demo-model")(processes.demo_model)
app.command("engine")(processes.engine)
app.command("eval")(remote.eval_version)
app.command("audit")(local.audit)
app.command("train")(processes.train)
app.command("refresh")(data.refresh)

adapters_app.command("add")(local.adapters_add)
adapters_app.command("compose")(local.adapters_compose)
adapters_app.command("merge")(local.adapters_merge)
adapters_app.command("list")(remote.adapters_list)
adapters_app.command("show")(remote.adapters_show)
adapters_app.command("upload")(remote.adapters_upload)
adapters_app.command("alias")(remote.adapters_alias)
adapters_app.command("canary")(remote.adapters_canary)
adapters_app.command("rollout")(remote.adapters_rollout)
adapters_app.command("shadow")(remote.adapters_shadow)
adapters_app.command("promote")(remote.adapters_promote)
adapters_app.command("abort")(remote.adapters_abort)
adapters_app.command("rollback")(remote.adapters_rollback)
adapters_app.command("delete")(remote.adapters_delete)

keys_app.command("create")(local.keys_create)
keys_app.command("list")(local.keys_list)
keys_app.command("revoke")(local.keys_revoke)
keys_app.command("engine")(local.keys_engine)

registry_app.command("check")(local.registry_check)
registry_app.command("copy")(local.registry_copy)

tenants_app.command("policy")(data.tenants_policy)
data_app.command("export")(data.data_export)


def main() -> None:
    app()
