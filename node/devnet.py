"""`longtail devnet up|down|status`: a whole local network on loopback.

anvil from the pinned npm package, the four contracts, OPEN minted to the demo
accounts, the synthetic Datanets and the shipped adapters registered by their
owners, and three node processes with different adapter sets. Every process
is recorded in `<home>/devnet/processes.json`, so `down` (or Ctrl-C in the
demo) stops exactly what `up` started and `up` after `down` starts clean.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3

from longtail.attribution.datanets import load_manifest
from longtail.contracts.anvil import DEV_ACCOUNTS, anvil_binary
from longtail.contracts.client import LongtailContracts
from longtail.contracts.deployment import OPEN, Deployment, deploy_all
from longtail.contracts.registry import AdapterRegistration
from longtail.node.adapter_binding import DeclarationMismatch, check_before_registering
from longtail.node.catalog import read_datanet_shares
from longtail.node.keys import create_keystore
from longtail.node.processes import ProcessGroup, free_port, wait_for_port
from longtail.serving.base_models import base_model_id, embedded_model_dir, longtail_home

REPO = Path(__file__).resolve().parent.parent
DATANETS = REPO / "data" / "datanets"
ADAPTERS = REPO / "data" / "adapters"
DEVNET_PASSWORD = "longtail-devnet"  # devnet keys only: anvil's public dev keys, encrypted all the same
PRICE_PER_1K_TOKENS = 2 * 10**16      # 0.02 OPEN per 1k tokens

# Which node serves which adapters (node-c holds none of its own at start: it fetches from peers).
NODE_ADAPTERS = {
    "node-a": ("legal-r8", "recipes-r16"),
    "node-b": ("clinical-code-r8", "reviews-r4"),
    "node-c": ("reviews-r4",),
}
ADAPTER_OWNERS = {"legal-r8": 5, "recipes-r16": 5, "clinical-code-r8": 6, "reviews-r4": 6}
NODE_ACCOUNTS = {"node-a": 1, "node-b": 2, "node-c": 3}
CLIENT_ACCOUNT = 4


class DevnetError(RuntimeError):
    """The devnet cannot start or is not running; the message says which part."""


@dataclasses.dataclass(frozen=True)
class DevnetNode:
    name: str
    address: str
    url: str
    adapters: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DevnetInfo:
    """What `up` wrote to `<home>/devnet/devnet.json`: where everything is."""

    rpc_url: str
    deployment: dict
    nodes: tuple[DevnetNode, ...]
    client: str
    home: str

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "nodes": [dataclasses.asdict(n) for n in self.nodes]}

    @classmethod
    def from_json(cls, data: dict) -> DevnetInfo:
        return cls(rpc_url=data["rpc_url"], deployment=data["deployment"],
                   nodes=tuple(DevnetNode(**{**n, "adapters": tuple(n["adapters"])}) for n in data["nodes"]),
                   client=data["client"], home=data["home"])


def devnet_home() -> Path:
    return longtail_home() / "devnet"


def datanet_owner_key(name: str) -> bytes:
    """The synthetic Datanets' owners are derived keys (see attribution.synthetic): the demo can sign for them."""
    return keccak(text=f"longtail-demo:{name}:owner")


def load_info(home: Path | None = None) -> DevnetInfo:
    path = (home or devnet_home()) / "devnet.json"
    if not path.exists():
        raise DevnetError(f"no devnet is up (no {path}); run `longtail devnet up`")
    return DevnetInfo.from_json(json.loads(path.read_text()))


def _fund_gas(w3: Web3, funder: LocalAccount, to: str) -> None:
    tx = {"from": funder.address, "to": to, "value": 10**18, "gas": 21_000,
          "nonce": w3.eth.get_transaction_count(funder.address), "gasPrice": w3.eth.gas_price,
          "chainId": w3.eth.chain_id}
    signed = funder.sign_transaction(tx)
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))


def _peer_id_bytes(private_key: bytes) -> bytes:
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.id import ID

    return ID.from_pubkey(create_new_key_pair(private_key).public_key).to_bytes()


def setup_chain(w3: Web3, adapters_dir: Path = ADAPTERS, datanets_dir: Path = DATANETS,
                node_urls: dict[str, str] | None = None, log=print) -> tuple[Deployment, dict[str, str]]:
    """Deploy, mint, register Datanets, adapters and nodes; returns the deployment and adapter ids by name."""
    from longtail.serving.peft_format import adapter_id_of

    deployer = DEV_ACCOUNTS[0]
    deployment = deploy_all(w3, deployer)
    contracts = LongtailContracts.connect(w3, deployment)
    log(f"contracts deployed: ledger {deployment.ledger}")
    for index in (*NODE_ACCOUNTS.values(), CLIENT_ACCOUNT, *set(ADAPTER_OWNERS.values())):
        contracts.token.mint(deployer, DEV_ACCOUNTS[index].address, 100_000 * OPEN)
    for folder in sorted(p.parent for p in datanets_dir.glob("*/manifest.json")):
        manifest = load_manifest(folder)
        owner = Account.from_key(datanet_owner_key(manifest.name))
        if owner.address != manifest.owner:
            raise DevnetError(f"{folder}: owner {manifest.owner} is not the demo's derived owner key")
        _fund_gas(w3, deployer, owner.address)
        contracts.registry.register_datanet(owner, manifest.name, manifest.records_root, manifest.record_count)
    log("Datanets registered by their owners")
    base_id = base_model_id(embedded_model_dir())
    adapter_ids = {}
    for name, owner_index in ADAPTER_OWNERS.items():
        folder = adapters_dir / name
        if not folder.exists():
            raise DevnetError(f"shipped adapter {folder} is missing: run `make demo TRAIN=1`")
        adapter_id = adapter_id_of(folder)
        shares = tuple((d.datanet_id, d.share_bps) for d in read_datanet_shares(folder))
        try:  # the node refuses any registration but the declared one; say so here rather than in every request
            check_before_registering(folder, DEV_ACCOUNTS[owner_index].address, shares)
        except DeclarationMismatch as error:
            raise DevnetError(str(error)) from None
        contracts.registry.register_adapter(DEV_ACCOUNTS[owner_index], AdapterRegistration(
            adapter_id=adapter_id, base_model_id=base_id, datanet_shares=shares,
            price_per_1k_tokens=PRICE_PER_1K_TOKENS, fetch_uri=f"longtail://adapter/{adapter_id}"))
        adapter_ids[name] = adapter_id
    log("adapters registered by their owners")
    for name, index in NODE_ACCOUNTS.items():
        account = DEV_ACCOUNTS[index]
        contracts.registry.register_node(account, 1_000 * OPEN, (node_urls or {}).get(name, ""),
                                         _peer_id_bytes(bytes(account.key)))
    log("nodes staked and registered")
    return deployment, adapter_ids


def write_node_config(home: Path, name: str, port: int, rpc_url: str, deployment_file: Path,
                      adapters_dir: Path = ADAPTERS) -> Path:
    folder = home / name
    folder.mkdir(parents=True, exist_ok=True)
    adapters = [str(adapters_dir / a) for a in NODE_ADAPTERS[name]]
    config = folder / "node.toml"
    config.write_text(
        "[node]\n"
        f'name = "{name}"\nhome = "{folder}"\nhttp_port = {port}\n'
        f'chain_rpc = "{rpc_url}"\ndeployment = "{deployment_file}"\n'
        f"adapters = {json.dumps(adapters)}\n"
        f"price_per_1k_tokens = {PRICE_PER_1K_TOKENS}\n"
        "checkpoint_every_receipts = 5\ncheckpoint_every_seconds = 10.0\nredeem_min_amount = 1\n"
        "max_tokens_limit = 128\n"
    )
    create_keystore(folder / "keystore.json", DEVNET_PASSWORD, bytes(DEV_ACCOUNTS[NODE_ACCOUNTS[name]].key))
    return config


def up(home: Path | None = None, log=print, node_timeout: float = 240.0) -> DevnetInfo:
    """Start anvil, set up the chain, start three nodes; returns where everything is."""
    home = home or devnet_home()
    if (home / "processes.json").exists():
        down(home, log=lambda *_: None)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    group = ProcessGroup(home / "processes.json")
    try:
        chain_port = free_port()
        anvil = group.start("anvil", [str(anvil_binary()), "--port", str(chain_port), "--silent"],
                            home / "anvil.log", url=f"http://127.0.0.1:{chain_port}")
        wait_for_port("127.0.0.1", chain_port, 15, anvil)
        rpc_url = f"http://127.0.0.1:{chain_port}"
        log(f"anvil listening on {rpc_url}")
        ports = {name: free_port() for name in NODE_ACCOUNTS}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        w3 = Web3(Web3.HTTPProvider(rpc_url))
        deployment, _ = setup_chain(w3, node_urls=urls, log=log)
        deployment_file = home / "deployment.json"
        deployment.save(deployment_file)
        env = {"LONGTAIL_KEY_PASSWORD": DEVNET_PASSWORD, "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        processes = {}
        for name, port in ports.items():
            config = write_node_config(home, name, port, rpc_url, deployment_file)
            processes[name] = group.start(name, [sys.executable, "-P", "-m", "longtail.node.cli", "node", "run", "--config",
                                                 str(config)], home / name / "node.log", env=env, url=urls[name])
        for name, port in ports.items():
            wait_for_port("127.0.0.1", port, node_timeout, processes[name])
            log(f"{name} serving on {urls[name]}")
        nodes = tuple(DevnetNode(name, DEV_ACCOUNTS[NODE_ACCOUNTS[name]].address, urls[name], NODE_ADAPTERS[name])
                      for name in NODE_ACCOUNTS)
        info = DevnetInfo(rpc_url=rpc_url, deployment=deployment.to_json(), nodes=nodes,
                          client=DEV_ACCOUNTS[CLIENT_ACCOUNT].address, home=str(home))
        (home / "devnet.json").write_text(json.dumps(info.to_json(), indent=2))
        return info
    except BaseException:
        group.stop_all()
        raise


def down(home: Path | None = None, log=print) -> int:
    """Stop every process the devnet started; returns how many were recorded."""
    home = home or devnet_home()
    group = ProcessGroup.from_state(home / "processes.json")
    count = len(group.records)
    group.stop_all()
    (home / "devnet.json").unlink(missing_ok=True)
    log(f"stopped {count} devnet processes")
    return count


def status(home: Path | None = None) -> dict:
    home = home or devnet_home()
    group = ProcessGroup.from_state(home / "processes.json")
    alive = group.alive()
    return {"home": str(home), "processes": [{"name": r.name, "pid": r.pid, "alive": alive[r.name], "url": r.url,
                                              "log": r.log} for r in group.records.values()]}
