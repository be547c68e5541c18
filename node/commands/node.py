"""`longtail node run`: start a node from a config file, environment and flags."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer

from node.config import ConfigError, load_config
from node.output import fail

app = typer.Typer(help="Run a Longtail node.", no_args_is_help=True)


@app.command("run")
def run_command(
    config: Path = typer.Option(None, "--config", help="node.toml ([node] table); every key is also a flag and "
                                                       "a LONGTAIL_<KEY> variable"),
    name: str = typer.Option(None, help="node name (its folder under $LONGTAIL_HOME/nodes)"),
    base_model: str = typer.Option(None, help="base model name or folder"),
    adapter: list[str] = typer.Option(None, "--adapter", help="PEFT adapter folder to serve (repeatable)"),
    database_url: str = typer.Option(None, help="SQLAlchemy URL (default: SQLite in the node's folder)"),
    chain_rpc: str = typer.Option(None, help="EVM JSON-RPC URL"),
    deployment: Path = typer.Option(None, help="deployment.json with the contracts' addresses"),
    http_host: str = typer.Option(None, help="HTTP listen host"),
    http_port: int = typer.Option(None, help="HTTP listen port"),
    price_per_1k_tokens: int = typer.Option(None, help="OPEN base units per 1,000 tokens"),
    checkpoint_every_receipts: int = typer.Option(None, help="post a checkpoint after this many receipts"),
    checkpoint_every_seconds: float = typer.Option(None, help="... or after this many seconds"),
    device: str = typer.Option(None, help="cpu or cuda"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level"),
) -> None:
    """Serve paid, receipted inference until Ctrl-C (exit 2 on a configuration error)."""
    from node.runner import NodeStartError, serve_forever

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {"name": name, "base_model": base_model, "adapters": tuple(adapter) if adapter else None,
                 "database_url": database_url, "chain_rpc": chain_rpc, "deployment": deployment,
                 "http_host": http_host, "http_port": http_port, "price_per_1k_tokens": price_per_1k_tokens,
                 "checkpoint_every_receipts": checkpoint_every_receipts,
                 "checkpoint_every_seconds": checkpoint_every_seconds, "device": device}
    try:
        node_config = load_config(config, overrides)
        asyncio.run(serve_forever(node_config))
    except (ConfigError, NodeStartError) as error:
        fail(str(error), code=2)
    except KeyboardInterrupt:
        pass
