"""`longtail adapter add|list|show|rm|verify`: the content-addressed adapter store in $LONGTAIL_HOME/adapters."""

from __future__ import annotations

from pathlib import Path

import typer

from longtail.node.output import fail, print_json, print_table
from longtail.serving.adapter_store import AdapterStore, AdapterStoreError, HttpSource, StoredAdapter
from longtail.serving.base_models import EMBEDDED_MODEL_NAME, BaseModelError, base_model_id, resolve_model
from longtail.serving.peft_format import AdapterRejected, ModuleShapes

app = typer.Typer(help="Manage LoRA adapters (PEFT format) in the local content-addressed store.",
                  no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="print JSON for scripts")
BASE_OPTION = typer.Option(EMBEDDED_MODEL_NAME, "--base", help="base model name or folder the adapter must fit")


def _store() -> AdapterStore:
    return AdapterStore()


def _base(name: str) -> tuple[ModuleShapes, str]:
    try:
        folder = resolve_model(name)
    except BaseModelError as error:
        fail(str(error))
    return ModuleShapes.from_model_dir(folder), base_model_id(folder)


def _row(record: StoredAdapter) -> tuple:
    return (", ".join(record.names) or "-", record.adapter_id, record.max_rank, ",".join(record.targets),
            f"{record.file_bytes / 1024:.1f} KiB")


@app.command("add")
def add_command(source: str = typer.Argument(..., help="a PEFT adapter folder, or an http(s) URL with --id"),
                name: str = typer.Option(None, "--name", help="a human name (alias) for the adapter"),
                adapter_id: str = typer.Option(None, "--id", help="the adapterId to fetch when SOURCE is a URL"),
                base: str = BASE_OPTION,
                force: bool = typer.Option(False, "--force", help="move --name to this adapter if it names another"),
                as_json: bool = JSON_OPTION) -> None:
    """Validate an adapter against the base and import it (re-importing the same bytes changes nothing)."""
    shapes, base_id = _base(base)
    store = _store()
    try:
        if source.startswith(("http://", "https://")):
            if adapter_id is None:
                fail("a URL source needs --id <adapterId>: the id is what proves the bytes")
            record = store.fetch(adapter_id.lower(), [HttpSource(source)], shapes)
            if name is not None:
                store.set_alias(name, record.adapter_id, replace=force)
                record = store.get(record.adapter_id)
        else:
            record = store.add(Path(source), shapes, name=name, base_model_id=base_id, replace_alias=force)
    except (AdapterRejected, AdapterStoreError) as error:
        fail(f"adapter rejected: {error}" if isinstance(error, AdapterRejected) else str(error))
    except OSError as error:  # a folder this user cannot list, a file that vanished mid-import
        fail(f"cannot read {source}: {error.strerror or error}")
    if as_json:
        print_json(record.to_json())
    else:
        print_table("imported", ["names", "adapterId", "max rank", "targets", "size"], [_row(record)])


@app.command("list")
def list_command(as_json: bool = JSON_OPTION) -> None:
    """List the adapters in the local store."""
    records = _store().list()
    if as_json:
        print_json([r.to_json() for r in records])
        return
    print_table("adapters", ["names", "adapterId", "max rank", "targets", "size"], [_row(r) for r in records])


@app.command("show")
def show_command(name_or_id: str = typer.Argument(..., help="alias or adapterId"), as_json: bool = JSON_OPTION) -> None:
    """Show one adapter: its id, aliases, size, ranks, targets and where it came from."""
    try:
        record = _store().get(name_or_id)
    except AdapterStoreError as error:
        fail(str(error))
    if as_json:
        print_json(record.to_json())
        return
    print_table(name_or_id, ["field", "value"], list(record.to_json().items()))


@app.command("rm")
def rm_command(name_or_id: str = typer.Argument(..., help="alias or adapterId"),
               alias_only: bool = typer.Option(False, "--alias-only", help="remove only this name, keep the files"),
               as_json: bool = JSON_OPTION) -> None:
    """Remove an adapter's files and all its aliases (or, with --alias-only, just one name)."""
    store = _store()
    try:
        if alias_only:
            record = store.get(name_or_id)
            store.remove_alias(name_or_id)
            result = {"removed_alias": name_or_id, "adapter_id": record.adapter_id}
        else:
            record = store.remove(name_or_id)
            result = {"removed": record.adapter_id, "names": list(record.names)}
    except AdapterStoreError as error:
        fail(str(error))
    if as_json:
        print_json(result)
    else:
        print_table("removed", ["field", "value"], list(result.items()))


@app.command("verify")
def verify_command(names: list[str] = typer.Argument(None, help="aliases or ids (default: every adapter)"),
                   base: str = typer.Option(None, "--base", help="also validate against this base model"),
                   as_json: bool = JSON_OPTION) -> None:
    """Re-hash stored adapters against their ids (and, with --base, re-validate them); exit 1 on any failure."""
    store = _store()
    shapes = _base(base)[0] if base else None
    try:
        results = [store.verify(name, shapes) for name in (names or [r.adapter_id for r in store.list()])]
    except AdapterStoreError as error:
        fail(str(error))
    if as_json:
        print_json([r.to_json() for r in results])
    else:
        print_table("verify", ["adapterId", "ok", "detail"],
                    [(r.adapter_id, "[green]yes[/green]" if r.ok else "[red]no[/red]", r.reason) for r in results])
    if not all(r.ok for r in results):
        raise typer.Exit(1)
