"""Builds a node from its config and runs it: engine, catalog, log, chain, payments, HTTP, libp2p.

This is the edge where files, the chain and sockets meet; everything it wires
is testable on its own. `open_node` returns a started `RunningNode` that a test,
the demo or `longtail node run` drives and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

from aiohttp import web
from eth_account import Account

from longtail.attribution.datanets import load_manifest
from longtail.attribution.receipts import ReceiptDomain
from longtail.attribution.spans import ensure_datanet_index
from longtail.attribution.store import ReceiptLog
from longtail.contracts.deployment import Deployment
from longtail.node.adapter_admin import AdapterAdmin, serve_stored
from longtail.node.adapter_binding import AdapterBindings
from longtail.node.api import SERVER_OPTIONS, build_app
from longtail.node.attributor import Attributor
from longtail.node.catalog import Catalog, CatalogEntry
from longtail.node.chain import ChainGateway
from longtail.node.checkpointer import Checkpointer
from longtail.node.config import NodeConfig
from longtail.node.errors import UnknownModel
from longtail.node.generation import GenerationGateway
from longtail.node.keys import KeystoreError, NodeKey, load_or_create
from longtail.node.p2p import P2PNode
from longtail.node.payments import PaymentIntake, Voucher
from longtail.node.service import Node
from longtail.serving.adapter_store import AdapterStore, AdapterStoreError, HttpSource
from longtail.serving.adapter_tiers import TierConfig
from longtail.serving.base_models import base_model_id, resolve_model
from longtail.serving.engine_client import EngineClient, LocalEngine, as_client
from longtail.serving.peft_format import ModuleShapes

log = logging.getLogger("longtail.node")
REPO_DATANETS = Path(__file__).resolve().parent.parent / "data" / "datanets"


class NodeStartError(RuntimeError):
    """The node cannot start: a missing key password, model, deployment or port; the message says which."""


def unlock_key(config: NodeConfig, private_key: bytes | None = None) -> NodeKey:
    password = os.environ.get(config.key_password_env)
    if not password:
        raise NodeStartError(f"set {config.key_password_env} to the keystore password "
                             f"(keystore: {config.keystore_path})")
    try:
        return load_or_create(config.keystore_path, password, private_key)
    except KeystoreError as error:
        raise NodeStartError(str(error)) from None


def datanet_folders(root: Path = REPO_DATANETS) -> dict[str, Path]:
    """datanetId -> folder, for every Datanet folder under `root`."""
    folders = {}
    for manifest in sorted(root.glob("*/manifest.json")):
        folders[load_manifest(manifest.parent).datanet_id] = manifest.parent
    return folders


def ensure_span_indexes(datanet_ids: set[str], tokenizer, root: Path = REPO_DATANETS) -> list[Path]:
    """Folders of the given Datanets, building a missing span index once (tokenizing the records)."""
    known = datanet_folders(root)
    folders = []
    for datanet_id in sorted(datanet_ids):
        folder = known.get(datanet_id)
        if folder is None:
            log.warning("no local copy of Datanet %s: its span matching is skipped", datanet_id)
            continue
        ensure_datanet_index(folder, tokenizer)  # built when missing or bound to another tokenizer / records root
        folders.append(folder)
    return folders


@dataclasses.dataclass
class RunningNode:
    node: Node
    runner: web.AppRunner
    url: str
    checkpointer: Checkpointer | None
    p2p: P2PNode | None = None
    announcer: asyncio.Task | None = None
    owns_engine: bool = True  # False when the caller passed in an engine shared with other nodes

    async def stop(self) -> None:
        if self.announcer is not None:
            self.announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.announcer
        if self.checkpointer is not None:
            await self.checkpointer.stop()
        await self.runner.cleanup()
        if self.p2p is not None:
            await asyncio.to_thread(self.p2p.stop)
        await self.node.attributor.close()  # data-credit scorings use the engine: cancelled before it stops
        await self.node.drain()  # the node's background engine work (data-credit scorings) ends before the engine
        if self.owns_engine:
            await asyncio.to_thread(self.node.generation.engine_shutdown)
        self.node.receipt_log.close()


def tier_config(config: NodeConfig) -> TierConfig:
    """The engine's adapter tiers over the node's own adapter store (plain values: the engine process builds them)."""
    return TierConfig(store_home=str(config.node_home / "adapters"), device_bytes=config.device_adapter_bytes,
                      host_bytes=config.host_adapter_bytes)


def build_engine(config: NodeConfig, model_dir: Path) -> EngineClient:
    """The engine in its own process (`engine_process`, the default: docs/node.md says why) or on a thread here."""
    options = {"kv_cache_bytes": config.kv_cache_bytes, "gpu_memory_fraction": config.gpu_memory_fraction,
               "adapters": tier_config(config)}
    if config.engine_process:
        from longtail.serving.engine_process import EngineProcess

        return EngineProcess(model_dir, device=config.device, **options)
    return LocalEngine.from_pretrained(model_dir, device=config.device, **options)


async def open_node(config: NodeConfig, private_key: bytes | None = None, engine=None,
                    tokenizer=None) -> RunningNode:
    """Start a node from config; `engine`/`tokenizer` may be shared by several nodes in one process (tests)."""
    from transformers import AutoTokenizer

    key = unlock_key(config, private_key)
    if config.gil_switch_interval_ms > 0:
        # Any thread running Python here (the engine's, when `engine_process` is off; SQLAlchemy in a worker) holds
        # the GIL; each hand-off to the event loop waits up to this long for it (Python's default, 5 ms, would
        # dominate a request's overhead).
        sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
    if not (config.chain_rpc and config.deployment):
        raise NodeStartError("a node needs chain_rpc and deployment (the contracts' addresses): "
                             "see `longtail devnet up` for a local chain")
    model_dir = resolve_model(config.base_model)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    owns_engine = engine is None
    engine = as_client(engine or await asyncio.to_thread(build_engine, config, model_dir))
    generation = GenerationGateway(engine, tokenizer)

    deployment = Deployment.load(Path(config.deployment))
    account = Account.from_key(key.private_key)
    chain = ChainGateway(config.chain_rpc, deployment, account)
    domain = ReceiptDomain(chain_id=deployment.chain_id, verifying_contract=deployment.ledger)
    config.node_home.mkdir(parents=True, exist_ok=True)
    receipt_log = await asyncio.to_thread(ReceiptLog.open, config.resolved_database_url, key.private_key, domain)

    base_id = await asyncio.to_thread(base_model_id, model_dir)
    catalog = Catalog(CatalogEntry(name=model_dir.name, adapter_id=None,
                                   price_per_1k_tokens=config.price_per_1k_tokens))
    shapes = ModuleShapes.from_model_dir(model_dir)
    adapter_store = AdapterStore(config.node_home / "adapters")
    for adapter in config.adapters:
        path = Path(adapter).expanduser()
        stored = await asyncio.to_thread(adapter_store.add, path, shapes, name=path.name, replace_alias=True)
        entry = await asyncio.to_thread(serve_stored, engine, adapter_store, stored.adapter_id, path.name,
                                        config.price_per_1k_tokens)
        catalog.add(entry)
    datanet_ids = {d.datanet_id for entry in catalog.entries() for d in entry.datanets}
    folders = await asyncio.to_thread(ensure_span_indexes, datanet_ids, tokenizer)
    attributor = await asyncio.to_thread(Attributor.for_node, folders, tokenizer, config.node_home,
                                         config.adapter_credit)

    store = receipt_log.store

    async def load_account(channel_id: str) -> tuple[int, Voucher | None]:
        owed = await asyncio.to_thread(store.channel_total, key.address, channel_id)
        record = await asyncio.to_thread(store.channel, channel_id)
        voucher = (Voucher(channel_id, record.voucher_amount, record.voucher_signature)
                   if record and record.voucher_signature else None)
        return owed, voucher

    async def save_voucher(voucher: Voucher, client: str) -> None:
        await asyncio.to_thread(store.record_voucher, voucher.channel_id, client, voucher.cumulative_amount,
                                voucher.signature)

    payments = PaymentIntake(key.address, chain.read_channel, chain.recover_voucher_signer, load_account,
                             save_voucher, channel_cache_seconds=config.channel_refresh_seconds)
    node = Node(config, key.address, catalog, generation, receipt_log, payments, attributor, base_id)
    for entry in catalog.entries():  # data credit: scored once per adapter, in the background (issue 23)
        attributor.start_data_credit(entry, engine)
    node.adapter_store = adapter_store

    async def fetch_adapter(adapter_id: str) -> CatalogEntry:
        """Just in time: bring an adapter registered on chain from a peer that serves it, verified by its id."""
        peers = list(config.peers)
        if config.fetch_from_registry_peers:
            peers += [e for e in await chain.registered_endpoints() if e.rstrip("/") != running_url[0]]
        registration = await chain.adapter_registration(adapter_id)
        if not registration.registered:
            raise UnknownModel(f"adapter {adapter_id} is neither served here nor registered on chain", param="model")
        sources = [PeerSource(p, asyncio.get_running_loop()) for p in sources_from_peers]
        sources += [HttpSource(f"{peer.rstrip('/')}/v1/adapters/{{adapter_id}}/bundle") for peer in peers]
        try:
            await asyncio.to_thread(adapter_store.fetch, adapter_id, sources, shapes)
        except AdapterStoreError as error:
            raise UnknownModel(f"adapter {adapter_id} could not be fetched from any peer: {error}",
                               param="model") from None
        entry = await asyncio.to_thread(serve_stored, engine, adapter_store, adapter_id, adapter_id,
                                        registration.price_per_1k_tokens)
        await asyncio.to_thread(attributor.add_folders,
                                ensure_span_indexes({d.datanet_id for d in entry.datanets}, tokenizer))
        attributor.start_data_credit(entry, engine)
        log.info("fetched adapter %s from a peer", adapter_id)
        return entry


    async def index_datanets(entry: CatalogEntry) -> None:
        await asyncio.to_thread(attributor.add_folders,
                                ensure_span_indexes({d.datanet_id for d in entry.datanets}, tokenizer))
        attributor.start_data_credit(entry, engine)

    admin = AdapterAdmin(engine, catalog, adapter_store, shapes, config.price_per_1k_tokens,
                         config.operator_token_env, fetch=fetch_adapter, after_add=index_datanets)
    node.adapter_fetcher = admin.just_in_time  # a deleted adapter is not fetched back just in time
    running_url = [""]
    sources_from_peers: list[P2PNode] = []
    checkpointer = Checkpointer(node, chain, config.checkpoint_every_receipts, config.checkpoint_every_seconds,
                                config.redeem_min_amount)
    node.checkpointer = checkpointer
    node.chain = chain
    node.adapter_bindings = AdapterBindings(chain.adapter_registration)

    runner = web.AppRunner(build_app(node, admin), access_log=None, **SERVER_OPTIONS)  # slow clients cut (api.py)
    await runner.setup()
    site = web.TCPSite(runner, config.http_host, config.http_port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise NodeStartError(f"cannot listen on {config.http_host}:{config.http_port}: {error.strerror}") from None
    port = runner.addresses[0][1]
    running_url[0] = f"http://{config.http_host}:{port}"
    checkpointer.start()
    running = RunningNode(node=node, runner=runner, url=running_url[0], checkpointer=checkpointer,
                          owns_engine=owns_engine)
    if config.p2p_listen:
        running.p2p, running.announcer = await start_p2p(config, key.private_key, node, engine, running_url[0])
        sources_from_peers.append(running.p2p)
    return running


class PeerSource:
    """An adapter source over libp2p: the peers announcing the adapter, hot holders first."""

    def __init__(self, p2p: P2PNode, loop: asyncio.AbstractEventLoop) -> None:
        self.p2p, self.loop = p2p, loop

    def describe(self) -> str:
        return f"libp2p peers of {self.p2p.peer_id.to_base58()}"

    def fetch(self, adapter_id: str) -> bytes:
        from longtail.serving.adapter_store import FetchFailed

        failures = []
        for peer in self.p2p.directory.find_peers(adapter_id):
            future = asyncio.run_coroutine_threadsafe(self.p2p.fetch_adapter(peer.peer_id, adapter_id), self.loop)
            try:
                return future.result(timeout=self.p2p.timeout + 5)
            except Exception as error:  # try the next holder
                failures.append(f"{peer.peer_id}: {error}")
        raise FetchFailed(f"no libp2p peer delivered {adapter_id}: {'; '.join(failures) or 'none announces it'}")


async def start_p2p(config: NodeConfig, private_key: bytes, node: Node, engine, http_url: str):
    """Start the libp2p host, connect to bootstrap peers, and announce this node every TTL/3 seconds."""
    loop = asyncio.get_running_loop()
    p2p = P2PNode(private_key, config.p2p_listen, ttl_seconds=config.announce_ttl_seconds)
    await asyncio.to_thread(p2p.start, loop)
    p2p.infer_handler = node.handle_peer_request
    p2p.bundle_provider = lambda adapter_id: (node.adapter_store.open_bundle(adapter_id)
                                              if node.catalog.by_adapter_id(adapter_id) else None)
    node.peer_id = p2p.peer_id.to_base58()
    node.p2p_addrs = list(p2p.addrs)
    for address in config.bootstrap:
        try:
            await p2p.connect(address)
        except Exception as error:  # a dead bootstrap peer must not stop the node
            log.warning("bootstrap peer %s unreachable: %s", address, error)

    async def announce_forever():
        while True:
            adapters = [e.adapter_id for e in node.catalog.entries() if e.adapter_id]
            try:
                await p2p.announce(http_endpoint=http_url, adapters_hot=tuple(adapters),
                                   adapters_stored=tuple(adapters), price_per_1k_tokens=config.price_per_1k_tokens,
                                   load=node.health()["in_flight"],
                                   free_kv_blocks=await asyncio.to_thread(_free_blocks, engine))
            except Exception as error:  # peers come and go; the next round tries again
                log.info("announcement failed: %s", error)
            await asyncio.sleep(max(config.announce_ttl_seconds / 3, 0.5))

    return p2p, asyncio.create_task(announce_forever(), name="announcer")


def _free_blocks(engine: EngineClient) -> int:
    """Free KV blocks, as the engine reports them (blocking)."""
    return engine.stats().free_kv_blocks


async def serve_forever(config: NodeConfig) -> None:
    running = await open_node(config)
    log.info("node %s serving on %s", running.node.address, running.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await running.stop()
