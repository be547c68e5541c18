"""`longtail datanet build|show|verify|generate`: Datanets as folders of JSONL records plus a manifest."""

from __future__ import annotations

from pathlib import Path

import typer

from longtail.attribution.datanets import (
    DatanetError,
    build_datanet,
    load_manifest,
    read_records,
    verify_datanet,
)
from longtail.node.output import fail, print_json, print_table

app = typer.Typer(help="Build, inspect and verify Datanets.", no_args_is_help=True)


@app.command("build")
def build_command(folder: Path = typer.Argument(..., help="folder holding records.jsonl"),
                  name: str = typer.Option(..., help="Datanet name"),
                  owner: str = typer.Option(..., help="owner address"),
                  domain: str = typer.Option("", help="free-form domain label"),
                  as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Compute the records root and datanetId and write manifest.json."""
    try:
        manifest = build_datanet(folder, name, owner, domain)
    except DatanetError as error:
        fail(str(error))
    _show(manifest.to_json(), as_json)


@app.command("show")
def show_command(folder: Path = typer.Argument(..., help="a Datanet folder"),
                 as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Show a Datanet's manifest and contributor count."""
    try:
        manifest = load_manifest(folder)
        contributors = len({record.contributor for record in read_records(folder)})
    except DatanetError as error:
        fail(str(error))
    _show({**manifest.to_json(), "contributors": contributors}, as_json)


@app.command("verify")
def verify_command(folder: Path = typer.Argument(..., help="a Datanet folder"),
                   as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Recompute the records root and count; exit 1 when they differ from the manifest."""
    try:
        manifest = verify_datanet(folder)
    except DatanetError as error:
        fail(str(error))
    _show({**manifest.to_json(), "verified": True}, as_json)


@app.command("generate")
def generate_command(out: Path = typer.Option(Path("data/datanets"), help="where to write the Datanets"),
                     seed: int = typer.Option(20261128, help="generator seed"),
                     as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Write the synthetic demo Datanets (deterministic for a seed)."""
    from longtail.attribution.synthetic import generate_all

    ids = generate_all(out, seed)
    if as_json:
        print_json(ids)
    else:
        print_table("datanets", ["name", "datanetId"], list(ids.items()))


def _show(data: dict, as_json: bool) -> None:
    if as_json:
        print_json(data)
    else:
        print_table(data.get("name", "datanet"), ["field", "value"], list(data.items()))


@app.command("index")
def index_command(folder: Path = typer.Argument(..., help="a Datanet folder"),
                  model: str = typer.Option("smollm2-135m-instruct", help="base model whose tokenizer to use"),
                  as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Tokenize the records with the base model's tokenizer and build the span (suffix-array) index."""
    from transformers import AutoTokenizer

    from longtail.attribution.spans import build_datanet_index, index_summary, load_datanet_index
    from longtail.serving.base_models import BaseModelError, resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        path = build_datanet_index(folder, tokenizer)
    except (BaseModelError, DatanetError) as error:
        fail(str(error))
    _show({**index_summary(load_datanet_index(folder)), "path": str(path)}, as_json)
