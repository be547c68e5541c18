"""The adapter lifecycle of a running node: list, add (by path or by adapterId), delete, and their metrics.

In the style of vLLM's and LoRAX's dynamic adapters, over this node's pieces:
the adapter store on disk (any number of adapters), the engine's tiers (the
device holds what its byte budget fits) and the catalog (what `model` in a
request resolves to). Listing is public; adding and deleting are the
operator's, behind a bearer token read from the environment variable the
config names (unset: both refused with 403). A delete lets running requests
finish; new ones, and ones still waiting for the adapter, get 404; a deleted
adapterId is not fetched again just in time until the operator adds it back.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from longtail.node.catalog import Catalog, CatalogEntry, read_datanet_shares
from longtail.node.errors import BadRequest, NotFound, OperatorOnly, OperatorTokenUnset, UnknownModel
from longtail.serving.adapter_store import AdapterStore, AdapterStoreError, is_adapter_id
from longtail.serving.engine import EngineStats
from longtail.serving.engine_client import EngineClient
from longtail.serving.peft_format import AdapterRejected, ModuleShapes

Fetch = Callable[[str], Awaitable[CatalogEntry]]


def serve_stored(engine: EngineClient, store: AdapterStore, adapter_id: str, name: str, price: int) -> CatalogEntry:
    """Hand a stored adapter to the engine's tiers (blocking) and describe it for the catalog."""
    path = store.path_of(adapter_id)
    loaded_id = engine.add_adapter(path)
    if loaded_id != adapter_id:
        raise AdapterStoreError(f"engine computed adapter id {loaded_id} for {path}, the store says {adapter_id}")
    return CatalogEntry(name=name, adapter_id=adapter_id, price_per_1k_tokens=price,
                        datanets=read_datanet_shares(path), path=path)


class AdapterAdmin:
    """GET/POST/DELETE /v1/adapters and the adapters' lines on /metrics."""

    def __init__(self, engine: EngineClient, catalog: Catalog, store: AdapterStore, shapes: ModuleShapes,
                 price_per_1k_tokens: int, token_env: str, fetch: Fetch | None = None,
                 after_add: Callable[[CatalogEntry], Awaitable[None]] | None = None) -> None:
        self.engine, self.catalog, self.store, self.shapes = engine, catalog, store, shapes
        self.price = price_per_1k_tokens
        self.token_env = token_env
        self.fetch = fetch
        self.after_add = after_add
        self.removed: set[str] = set()  # deleted by the operator: not fetched again just in time

    async def just_in_time(self, adapter_id: str) -> CatalogEntry:
        """The node's fetcher for an adapterId it does not serve: fetched from peers, unless the operator deleted it."""
        if adapter_id.lower() in self.removed:
            raise UnknownModel(f"adapter {adapter_id} was deleted from this node by its operator", param="model")
        if self.fetch is None:
            raise UnknownModel(f"no model or adapter {adapter_id!r} on this node", param="model")
        return await self.fetch(adapter_id)

    def check_operator(self, authorization: str | None) -> None:
        token = os.environ.get(self.token_env)
        if not token:
            raise OperatorTokenUnset(f"adapter management is off: set {self.token_env} to the operator's token")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise OperatorOnly("adding or deleting adapters needs the operator's token (Authorization: Bearer ...)")

    async def list(self) -> dict:
        infos = await asyncio.to_thread(self.engine.list_adapters)
        data = []
        for info in infos:
            entry = self.catalog.by_adapter_id(info.adapter_id)
            data.append({**info.to_json(), "object": "adapter", "served": entry is not None,
                         "model": entry.name if entry else None,
                         "price_per_1k_tokens": str(entry.price_per_1k_tokens) if entry else None})
        return {"object": "list", "data": data}

    async def add(self, body: object, authorization: str | None) -> dict:
        self.check_operator(authorization)
        if not isinstance(body, dict) or set(body) - {"path", "adapter_id", "name", "price_per_1k_tokens"}:
            raise BadRequest("body must be an object with one of path or adapter_id, and optionally name and "
                             "price_per_1k_tokens")
        path, adapter_id, name = body.get("path"), body.get("adapter_id"), body.get("name")
        price = body.get("price_per_1k_tokens", self.price)
        if (path is None) == (adapter_id is None):
            raise BadRequest("give exactly one of path (a PEFT folder on this machine) or adapter_id")
        if name is not None and (not isinstance(name, str) or not name):
            raise BadRequest("name must be a non-empty string", param="name")
        if isinstance(price, bool) or not isinstance(price, int) or not 0 <= price < 2**128:
            raise BadRequest("price_per_1k_tokens must be a non-negative integer", param="price_per_1k_tokens")
        if path is not None:
            if not isinstance(path, str):
                raise BadRequest("path must be a string", param="path")
            entry = await asyncio.to_thread(self._add_path, Path(path).expanduser(), name, price)
        else:
            if not isinstance(adapter_id, str) or not is_adapter_id(adapter_id.lower()):
                raise BadRequest("adapter_id must be 0x and 64 hex digits", param="adapter_id")
            if self.fetch is None:
                raise BadRequest("this node has no peers to fetch adapters from", param="adapter_id")
            self.removed.discard(adapter_id.lower())
            entry = await self.fetch(adapter_id.lower())
            if name is not None or price != entry.price_per_1k_tokens and "price_per_1k_tokens" in body:
                entry = CatalogEntry(name or entry.name, entry.adapter_id, price, entry.datanets, entry.path)
        self.removed.discard(entry.adapter_id)
        self.catalog.add(entry)
        if self.after_add is not None:
            await self.after_add(entry)
        return {"object": "adapter", "adapter_id": entry.adapter_id, "model": entry.name,
                "price_per_1k_tokens": str(entry.price_per_1k_tokens)}

    def _add_path(self, path: Path, name: str | None, price: int) -> CatalogEntry:
        try:
            stored = self.store.add(path, self.shapes, name=name, replace_alias=True)
            return serve_stored(self.engine, self.store, stored.adapter_id, name or stored.adapter_id, price)
        except (AdapterRejected, AdapterStoreError, OSError, ValueError) as error:
            raise BadRequest(f"adapter at {path} not added: {error}", param="path") from None

    async def remove(self, name_or_id: str, authorization: str | None) -> dict:
        self.check_operator(authorization)
        try:
            entry = self.catalog.resolve(name_or_id)
        except Exception:
            entry = None
        if entry is None or entry.adapter_id is None:
            raise NotFound(f"this node serves no adapter {name_or_id!r}")
        adapter_id = entry.adapter_id
        self.removed.add(adapter_id)
        self.catalog.remove(adapter_id)  # new requests 404 from here on
        await asyncio.to_thread(self.engine.remove_adapter, adapter_id)  # running ones finish
        return {"object": "adapter", "adapter_id": adapter_id, "deleted": True}

    async def metrics_text(self) -> bytes:
        return render_metrics(await asyncio.to_thread(self.engine.stats))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(stats: EngineStats) -> bytes:
    """Prometheus text of the engine's adapter tiers: bytes against budgets, evictions, cold-load latency, and per
    adapter its tier, loads, hits, evictions and tokens served."""
    lines: list[str] = []

    def family(name: str, kind: str, doc: str, samples: list[tuple[str, float | int]]) -> None:
        lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    family("longtail_adapter_tier_bytes", "gauge", "Bytes of adapters resident in a tier",
           [(f'{{tier="{t}"}}', v) for t, v in sorted(stats.tier_bytes.items())])
    family("longtail_adapter_tier_budget_bytes", "gauge", "Byte budget of a tier",
           [(f'{{tier="{t}"}}', v) for t, v in sorted(stats.tier_budget.items())])
    family("longtail_adapter_tier_evictions_total", "counter", "Adapters evicted from a tier to respect its budget",
           [(f'{{tier="{t}"}}', v) for t, v in sorted(stats.evictions.items())])
    family("longtail_adapter_load_failures_total", "counter", "Adapter loads that failed", [("", stats.load_failures)])
    lines.extend(["# HELP longtail_adapter_cold_wait_seconds Cold loads (adapter from disk or a peer): a request's "
                  "admission to its adapter being usable on the device",
                  "# TYPE longtail_adapter_cold_wait_seconds histogram"])
    lines.extend(f'longtail_adapter_cold_wait_seconds_bucket{{le="{bound}"}} {count}'
                 for bound, count in stats.cold_wait_buckets)
    lines.extend([f'longtail_adapter_cold_wait_seconds_bucket{{le="+Inf"}} {stats.cold_wait_count}',
                  f"longtail_adapter_cold_wait_seconds_sum {stats.cold_wait_sum}",
                  f"longtail_adapter_cold_wait_seconds_count {stats.cold_wait_count}"])
    infos = stats.adapters
    family("longtail_adapter_resident", "gauge", "1 for the tier that holds each stored adapter now",
           [(f'{{adapter="{_label(i.adapter_id)}",tier="{i.tier}"}}', 1) for i in infos])
    for name, attribute, doc in (("loads", "loads", "Times the adapter was brought to the device"),
                                 ("hits", "hits", "Requests admitted while the adapter was on the device"),
                                 ("evictions", "evictions", "Times the adapter left the device to make room"),
                                 ("tokens_served", "tokens_served", "Tokens generated under the adapter")):
        family(f"longtail_adapter_{name}_total", "counter", doc,
               [(f'{{adapter="{_label(i.adapter_id)}"}}', getattr(i, attribute)) for i in infos])
    return ("\n".join(lines) + "\n").encode()
