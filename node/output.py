"""How every CLI command prints: a rich table for people, one JSON document for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

console = Console()
error_console = Console(stderr=True)


def print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def fail(message: str, code: int = 1) -> None:
    """Print one clear line on stderr and leave with `code` (never a traceback for user errors)."""
    import typer

    error_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)
