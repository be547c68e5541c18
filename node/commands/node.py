"""`longtail node run`: start a node from a config file, environment and flags.

The flags are made from `NodeConfig`'s fields, so every key of the `[node]`
table is a flag too, with the same name in kebab case (lists repeat the flag).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import typing
from pathlib import Path

import typer

from longtail.node.config import ConfigError, NodeConfig, load_config
from longtail.node.output import fail

app = typer.Typer(help="Run a Longtail node.", no_args_is_help=True)

FLAG_HELP = {
    "name": "node name (its folder under $LONGTAIL_HOME/nodes)",
    "home": "the node's folder (default: $LONGTAIL_HOME/nodes/<name>)",
    "keystore": "encrypted key file (default: keystore.json in the node's folder)",
    "key_password_env": "environment variable that holds the keystore password",
    "base_model": "base model name or folder",
    "adapters": "PEFT adapter folder to serve (repeatable)",
    "database_url": "SQLAlchemy URL (default: SQLite in the node's folder)",
    "chain_rpc": "EVM JSON-RPC URL",
    "deployment": "deployment.json with the contracts' addresses",
    "http_host": "HTTP listen host",
    "http_port": "HTTP listen port",
    "public_url": "URL peers should use for HTTP (default: http://host:port)",
    "p2p_listen": "libp2p listen multiaddr ('' turns libp2p off)",
    "bootstrap": "libp2p multiaddr of a peer to join through (repeatable)",
    "peers": "libp2p multiaddr of a peer to dial directly (repeatable)",
    "fetch_from_registry_peers": "fetch registered adapters this node lacks from peers that announce them",
    "price_per_1k_tokens": "OPEN base units per 1,000 tokens",
    "checkpoint_every_receipts": "post a checkpoint after this many receipts",
    "checkpoint_every_seconds": "... or after this many seconds",
    "redeem_min_amount": "redeem a channel's vouchers only once this much is owed (gas is worth it)",
    "channel_refresh_seconds": "re-read a channel from the chain in the background once its view is this old",
    "max_prompt_tokens": "longest prompt accepted (400 beyond)",
    "max_tokens_limit": "largest max_tokens accepted",
    "max_waiting_requests": "requests in flight before answering 429",
    "device": "cpu or cuda",
    "kv_cache_bytes": "bytes of the paged KV cache pool",
    "device_adapter_bytes": "bytes of adapters resident on the device (evicted beyond; no cap on their count)",
    "host_adapter_bytes": "bytes of adapters kept in host memory (evicted beyond; the rest stay on disk)",
    "operator_token_env": "environment variable holding the token for POST/DELETE /v1/adapters",
    "announce_ttl_seconds": "lifetime of a gossip announcement",
    "adapter_credit": "score each adapter's held-out data credit once, when first served (never per request)",
    "gil_switch_interval_ms": "CPython's GIL switch interval in this process",
    "engine_process": "run the engine in its own process (default) or on a thread of the node's",
}
REPEATED_FLAG = {"adapters": "--adapter", "bootstrap": "--bootstrap", "peers": "--peer"}


def _option(field: dataclasses.Field, hint: object) -> tuple[object, object]:
    """(annotation, typer.Option) for one config field; every default is None (= not given on the command line)."""
    dashed = field.name.replace("_", "-")
    help_text = FLAG_HELP.get(field.name, field.name.replace("_", " "))
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    base = arguments[0] if arguments and typing.get_origin(hint) is not tuple else hint
    if typing.get_origin(hint) is tuple:
        return list[str] | None, typer.Option(None, REPEATED_FLAG.get(field.name, f"--{dashed}"), help=help_text)
    if base is bool:
        return bool | None, typer.Option(None, f"--{dashed}/--no-{dashed}", help=help_text, show_default=False)
    return base | None, typer.Option(None, f"--{dashed}", help=help_text)


def run_command(config: Path | None = None, verbose: bool = False, **flags) -> None:
    """Serve paid, receipted inference until Ctrl-C (exit 2 on a configuration error)."""
    from longtail.node.chain import ChainError
    from longtail.node.runner import NodeStartError, serve_forever
    from longtail.serving.adapter_store import AdapterStoreError
    from longtail.serving.base_models import BaseModelError
    from longtail.serving.errors import EngineError
    from longtail.serving.peft_format import AdapterRejected

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {name: (tuple(value) if isinstance(value, list) else value) for name, value in flags.items()}
    overrides = {name: (value if value != () else None) for name, value in overrides.items()}
    try:
        node_config = load_config(config, overrides)
        asyncio.run(serve_forever(node_config))
    except (ConfigError, NodeStartError) as error:
        fail(str(error), code=2)
    except AdapterRejected as error:  # an adapter to serve is unsafe or broken (NaN weights, a bad config)
        fail(f"adapter rejected: {error}", code=2)
    except (AdapterStoreError, BaseModelError, EngineError, ChainError) as error:
        fail(f"cannot start the node: {error}", code=2)
    except OSError as error:  # an unreadable file or folder named in the config
        fail(f"cannot start the node: {error.strerror or error}"
             + (f": {error.filename}" if getattr(error, "filename", None) else ""), code=2)
    except KeyboardInterrupt:
        pass


def _signature() -> inspect.Signature:
    hints = typing.get_type_hints(NodeConfig)
    parameters = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
        default=typer.Option(None, "--config", help="node.toml ([node] table); every key is also a flag and a "
                                                    "LONGTAIL_<KEY> variable"))]
    for field in dataclasses.fields(NodeConfig):
        annotation, option = _option(field, hints[field.name])
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=option))
    parameters.append(inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                        default=typer.Option(False, "--verbose", "-v", help="log at INFO level")))
    return inspect.Signature(parameters)


run_command.__signature__ = _signature()
app.command("run")(run_command)
