"""`longtail model list|import|show`: base models in the local cache."""

from __future__ import annotations

from pathlib import Path

import typer

from longtail.node.output import fail, print_json, print_table
from longtail.serving.base_models import BaseModelError, describe, import_model, list_models, resolve_model

app = typer.Typer(help="Manage base models (HF Llama-family folders) in $LONGTAIL_HOME/models.", no_args_is_help=True)


@app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """List the base models in the local cache."""
    infos = [describe(path) for path in list_models()]
    if as_json:
        print_json([info.to_json() for info in infos])
        return
    print_table("base models", ["name", "arch", "params", "baseModelId"],
                [(i.name, i.architecture, f"{i.parameters / 1e6:.1f} M", i.base_model_id) for i in infos])


@app.command("show")
def show_command(name: str = typer.Argument(..., help="model name or folder"),
                 as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Show one base model: architecture, size and its baseModelId."""
    try:
        info = describe(resolve_model(name))
    except BaseModelError as error:
        fail(str(error))
    if as_json:
        print_json(info.to_json())
        return
    print_table(info.name, ["field", "value"], list(info.to_json().items()))


@app.command("import")
def import_command(source: Path = typer.Argument(..., help="an HF model folder or a .gguf file"),
                   name: str = typer.Option(None, help="name in the cache (default: the folder or file name)"),
                   as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Copy an HF folder, or convert a GGUF file, into the local model cache."""
    try:
        info = describe(import_model(source, name))
    except BaseModelError as error:
        fail(str(error))
    if as_json:
        print_json(info.to_json())
    else:
        print_table("imported", ["name", "path", "baseModelId"], [(info.name, info.path, info.base_model_id)])
