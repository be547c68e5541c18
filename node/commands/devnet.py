"""`longtail devnet up|down|status`: the local network of the demo, as separate commands."""

from __future__ import annotations

import typer

from longtail.node.output import console, fail, print_json, print_table

app = typer.Typer(help="Start, inspect and stop a local network (anvil, contracts, three nodes).",
                  no_args_is_help=True)


@app.command("up")
def up_command(as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Start anvil, deploy and register everything, start three nodes; leaves them running."""
    from longtail.node.devnet import DevnetError, up

    try:
        info = up(log=(lambda *_: None) if as_json else console.print)
    except DevnetError as error:
        fail(str(error))
    if as_json:
        print_json(info.to_json())
    else:
        print_table("devnet", ["node", "address", "url", "adapters"],
                    [(n.name, n.address, n.url, ", ".join(n.adapters)) for n in info.nodes])


@app.command("down")
def down_command() -> None:
    """Stop every process `devnet up` started."""
    from longtail.node.devnet import down

    down(log=console.print)


@app.command("status")
def status_command(as_json: bool = typer.Option(False, "--json", help="print JSON for scripts")) -> None:
    """Show the devnet's processes; exit 1 when one of them is down."""
    from longtail.node.devnet import status

    state = status()
    if as_json:
        print_json(state)
    else:
        print_table("devnet processes", ["name", "pid", "alive", "url"],
                    [(p["name"], p["pid"], p["alive"], p["url"] or "-") for p in state["processes"]])
    if not state["processes"] or not all(p["alive"] for p in state["processes"]):
        raise typer.Exit(1)
