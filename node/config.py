"""The node's configuration: one dataclass, filled from file, then environment, then flags.

Precedence is flag > env (`LONGTAIL_<FIELD>`) > TOML file > default, resolved here
and nowhere else, so every option of `longtail node run` is also a file key and
an environment variable.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from pathlib import Path

from longtail.serving.base_models import EMBEDDED_MODEL_NAME, longtail_home

ENV_PREFIX = "LONGTAIL_"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or unknown."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start; see docs/node.md for each field."""

    name: str = "node"
    home: Path | None = None
    keystore: Path | None = None
    key_password_env: str = "LONGTAIL_KEY_PASSWORD"
    base_model: str = EMBEDDED_MODEL_NAME
    adapters: tuple[str, ...] = ()
    database_url: str | None = None
    chain_rpc: str | None = None
    deployment: Path | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    public_url: str | None = None
    p2p_listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    fetch_from_registry_peers: bool = True
    price_per_1k_tokens: int = 10**16
    checkpoint_every_receipts: int = 100
    checkpoint_every_seconds: float = 60.0
    redeem_min_amount: int = 10**16
    channel_refresh_seconds: float = 30.0
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 256
    max_waiting_requests: int = 64
    device: str = "cpu"
    # None: 256 MiB on a CPU (host memory is shared with everything else); on CUDA the pool takes what is free
    # after the weights, the adapter budget and a step's activations, times gpu_memory_fraction (serving.engine).
    kv_cache_bytes: int | None = None
    gpu_memory_fraction: float = 0.9
    # Adapter tiers (docs/adapters.md): bytes of adapter factors held on the device and in host memory. No count cap:
    # the node stores any number of adapters, the device holds what its budget fits, the rest wait one load away.
    device_adapter_bytes: int | None = None  # None: 1 GiB on a CPU, a tenth of what is free on CUDA
    host_adapter_bytes: int = 2 * 2**30
    # The environment variable holding the operator's token for POST/DELETE /v1/adapters (unset: both refused).
    operator_token_env: str = "LONGTAIL_OPERATOR_TOKEN"
    announce_ttl_seconds: float = 30.0
    # Score each adapter's data credit (held-out gain per Datanet, docs/attribution.md) once, when first served.
    adapter_credit: bool = True
    gil_switch_interval_ms: float = 0.5
    engine_process: bool = True

    @property
    def node_home(self) -> Path:
        return self.home or (longtail_home() / "nodes" / self.name)

    @property
    def keystore_path(self) -> Path:
        return self.keystore or (self.node_home / "keystore.json")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.node_home / 'node.sqlite'}"

    @property
    def http_url(self) -> str:
        return self.public_url or f"http://{self.http_host}:{self.http_port}"


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(NodeConfig)


def _coerce(name: str, value: object, hint: object) -> object:
    """Turn a TOML/env/flag value into the field's type, with an error naming the field."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args else hint
    if value is None:
        return None
    try:
        if typing.get_origin(target) is tuple:
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            return tuple(str(item) for item in value)
        if target is Path:
            return Path(str(value)).expanduser()
        if target is bool:
            return value if isinstance(value, bool) else str(value).lower() in {"1", "true", "yes", "on"}
        if target in (int, float, str):
            return target(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{name}: cannot use {value!r} as {getattr(target, '__name__', target)}") from error
    return value


def load_config(file: Path | None = None, overrides: dict[str, object] | None = None,
                environ: dict[str, str] | None = None) -> NodeConfig:
    """Merge defaults, a TOML file, `LONGTAIL_*` variables and flag overrides (None = not given)."""
    hints = _field_types()
    values: dict[str, object] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config {file}: {error}") from error
        section = data.get("node", data)
        unknown = set(section) - set(hints)
        if unknown:
            raise ConfigError(f"unknown config keys in {file}: {sorted(unknown)}")
        values.update(section)
    environ = os.environ if environ is None else environ
    for name in hints:
        env_name = ENV_PREFIX + name.upper()
        # LONGTAIL_HOME is the whole tool's home, not this node's folder.
        if name != "home" and env_name in environ:
            values[name] = environ[env_name]
    for name, value in (overrides or {}).items():
        if name not in hints:
            raise ConfigError(f"unknown option {name}")
        if value is not None:
            values[name] = value
    return NodeConfig(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})
