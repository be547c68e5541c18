"""The `longtail` command: one entry point, a sub-command per job."""

from __future__ import annotations

import importlib.metadata

import typer

from longtail.node.commands import adapter, client, datanet, devnet, model, receipts, train
from longtail.node.commands import node as node_commands
from longtail.node.output import console, print_json, print_table

app = typer.Typer(
    help="Longtail: a decentralized inference node serving thousands of LoRA adapters with signed receipts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
app.add_typer(datanet.app, name="datanet")
app.add_typer(adapter.app, name="adapter")
app.add_typer(receipts.receipt_app, name="receipt")
app.add_typer(receipts.log_app, name="log")
app.add_typer(node_commands.app, name="node")
app.add_typer(devnet.app, name="devnet")
app.command("submit")(client.submit)
app.command("audit")(client.audit)
app.command("claim")(client.claim)
app.command("train")(train.train)


@app.command()
def version(as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Print Longtail's version."""
    current = importlib.metadata.version("longtail")
    if as_json:
        print_json({"longtail": current})
    else:
        console.print(f"longtail {current}")


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Check every part a node needs; exit 1 when a required part is missing."""
    from longtail.node.doctor import run_checks

    checks = run_checks()
    if as_json:
        print_json([{"part": c.part, "ready": c.ready, "detail": c.detail, "required": c.required} for c in checks])
    else:
        print_table("longtail doctor", ["part", "ready", "detail"],
                    [(c.part, "[green]yes[/green]" if c.ready else "[red]no[/red]", c.detail) for c in checks])
    if any(c.required and not c.ready for c in checks):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
