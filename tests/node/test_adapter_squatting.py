"""Issue 20, attack 5: adapter id squatting, performed on a real anvil against a running node; fails if it pays.

The squatter sees a trainer's adapter (its bytes are public: `/v1/adapters/{id}/bundle`), registers its adapterId
first with its own address and no Datanets, and waits for nodes to earn for it. The adapter's config declares its
trainer (`longtail` object, inside the adapterId), so the node refuses it under the squatter's registration (409)
and nothing reaches the squatter; an adapter registered as it declares is served and paid as before.
"""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest

from longtail.contracts.anvil import DEV_ACCOUNTS, Anvil
from longtail.contracts.client import LongtailContracts
from longtail.contracts.registry import AdapterInfo, AdapterRegistration
from longtail.node.adapter_binding import DeclarationMismatch, binding_problem, check_before_registering
from longtail.node.devnet import (
    ADAPTER_OWNERS,
    ADAPTERS,
    CLIENT_ACCOUNT,
    NODE_ACCOUNTS,
    NODE_ADAPTERS,
    PRICE_PER_1K_TOKENS,
    setup_chain,
)
from longtail.serving.peft_format import adapter_id_of, declaration_of, read_declaration, write_declaration

PASSWORD = "test-password"
TRAINER, SQUATTER = 7, 8
OWNER = DEV_ACCOUNTS[ADAPTER_OWNERS["reviews-r4"]].address
DN = "0x" + "82" * 32


# --- the node's rule, without a chain ----------------------------------------------------------------------

def _registration(owner: str, shares=()) -> AdapterInfo:
    return AdapterInfo(adapter_id="0x" + "ab" * 32, owner=owner, base_model_id="0x" + "00" * 32,
                       datanet_shares=tuple(shares), price_per_1k_tokens=1, fetch_uri="", registered_at=1)


def test_the_binding_rule():
    declared = declaration_of(OWNER, [(DN, 10_000)])
    local = ((DN, 10_000),)
    assert binding_problem("x", declared, _registration(OWNER.lower(), [(DN.upper().replace("0X", "0x"), 10_000)]),
                           local) is None
    squatter = DEV_ACCOUNTS[SQUATTER].address
    assert "registered on chain by " + squatter in binding_problem("x", declared, _registration(squatter), local)
    assert "Datanet shares" in binding_problem("x", declared, _registration(OWNER), local)  # owner right, no Datanets
    assert "not registered" in binding_problem("x", declared, _registration("0x" + "00" * 20), local)
    assert "declares no owner" in binding_problem("x", None, _registration(OWNER, [(DN, 10_000)]), local)
    # The safetensors metadata (what receipts attribute to) must agree with the declaration too.
    assert "safetensors metadata" in binding_problem("x", declared, _registration(OWNER, [(DN, 10_000)]), ())


def test_our_tooling_refuses_to_register_someone_elses_adapter(tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(ADAPTERS / "reviews-r4", folder)
    declared = read_declaration(folder)
    assert declared is not None and declared.owner == OWNER
    shares = declared.datanets
    assert check_before_registering(folder, OWNER.lower(), shares) == declared
    with pytest.raises(DeclarationMismatch, match="not " + DEV_ACCOUNTS[SQUATTER].address):
        check_before_registering(folder, DEV_ACCOUNTS[SQUATTER].address, shares)
    with pytest.raises(DeclarationMismatch, match="differ"):
        check_before_registering(folder, OWNER, ())


# --- the attack on anvil ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.chain
def test_a_squatted_adapter_id_earns_the_squatter_nothing(tmp_path, shared_model, monkeypatch):
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)
    anvil = Anvil().start()
    try:
        deployment, adapter_ids = setup_chain(anvil.w3, log=lambda *_: None)
        deployment.save(tmp_path / "deployment.json")
        contracts = LongtailContracts.connect(anvil.w3, deployment)
        honest = contracts.registry.get_adapter(adapter_ids["reviews-r4"])

        # The trainer's new adapter: trained on code-reviews, declaring the trainer as owner. Not registered yet.
        victim = tmp_path / "victim-r4"
        shutil.copytree(ADAPTERS / "reviews-r4", victim)
        write_declaration(victim, declaration_of(DEV_ACCOUNTS[TRAINER].address, honest.datanet_shares))
        victim_id = adapter_id_of(victim)
        assert not contracts.registry.get_adapter(victim_id).registered
        # The attack: the squatter registers the id first, as its own, with no Datanets (the chain accepts it).
        squatter = DEV_ACCOUNTS[SQUATTER]
        contracts.registry.register_adapter(squatter, AdapterRegistration(
            adapter_id=victim_id, base_model_id=honest.base_model_id, datanet_shares=(),
            price_per_1k_tokens=PRICE_PER_1K_TOKENS, fetch_uri="squatted"))
        assert contracts.registry.get_adapter(victim_id).owner == squatter.address

        asyncio.run(_scenario(tmp_path, anvil, deployment, shared_model, contracts, victim, victim_id))
    finally:
        anvil.stop()


async def _scenario(tmp_path, anvil, deployment, shared_model, contracts, victim, victim_id):
    from longtail.node.client import PayingClient
    from longtail.node.config import NodeConfig
    from longtail.node.runner import open_node

    engine, tokenizer = shared_model
    config = NodeConfig(name="node-b", home=tmp_path / "node-b", http_port=0, chain_rpc=anvil.url,
                        deployment=tmp_path / "deployment.json",
                        adapters=(*(str(ADAPTERS / a) for a in NODE_ADAPTERS["node-b"]), str(victim)),
                        price_per_1k_tokens=PRICE_PER_1K_TOKENS, checkpoint_every_receipts=10_000,
                        checkpoint_every_seconds=3600.0, redeem_min_amount=1, max_prompt_tokens=256,
                        max_tokens_limit=64)
    running = await open_node(config, bytes(DEV_ACCOUNTS[NODE_ACCOUNTS["node-b"]].key), engine, tokenizer)
    client = PayingClient(DEV_ACCOUNTS[CLIENT_ACCOUNT], anvil.url, deployment, tmp_path / "client")
    squatter = DEV_ACCOUNTS[SQUATTER].address
    try:
        async with aiohttp.ClientSession() as session:
            node = running.node
            channel = await asyncio.to_thread(client.ensure_deposit, node.address, 10**18, 10**18)
            size = node.receipt_log.size
            for model in ("victim-r4", victim_id):  # by name and by id
                body = {"model": model, "messages": [{"role": "user", "content": "Review a retry loop."}],
                        "max_tokens": 4}
                headers = {"X-Longtail-Channel": channel, **client.authorize(channel, body).headers()}
                async with session.post(f"{running.url}/v1/chat/completions", json=body, headers=headers) as r:
                    status, error = r.status, await r.json()
                assert status == 409, error
                assert error["error"]["code"] == "adapter_owner_conflict"
                assert error["error"]["type"] == "invalid_request_error"
                assert squatter in error["error"]["message"] and DEV_ACCOUNTS[TRAINER].address in error["error"]["message"]
            assert node.receipt_log.size == size  # no receipt, nothing owed on the channel
            assert node.payments._accounts[channel].owed == 0

            # The honest path: an adapter registered as it declares is served and paid to its owner.
            answer = await client.ask(session, running.url, "reviews-r4", "Review a lock held during I/O.", 4)
            assert answer.receipt.receipt.price > 0
            assert await client.settle(session, running.url) == answer.receipt.receipt.price
            result = await running.checkpointer.run_round()
            assert result.epoch is not None
        assert contracts.ledger.claimable(OWNER) > 0
        assert contracts.ledger.claimable(squatter) == 0
        assert {r.receipt.adapter_id for r in (node.receipt_log.get(s) for s in range(node.receipt_log.size))} \
            == {adapter_id_of(ADAPTERS / "reviews-r4")}
    finally:
        await running.stop()


def test_the_shipped_adapters_declare_their_devnet_owners():
    for name, index in ADAPTER_OWNERS.items():
        declared = read_declaration(ADAPTERS / name)
        assert declared is not None and declared.owner == DEV_ACCOUNTS[index].address, name

