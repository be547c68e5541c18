"""The payment attacks of issue 20, performed against a running node on a real anvil; a test fails if its attack works.

Attack 1 (a node drains a client's deposit through `payCumulative`), 3 (serving on a refunded channel), 4 (one dead
channel stops settlement), 8 (billing a stranger's channel without a signature), 9 (unbounded credit on a cold
channel), 10 (unpaid work: a peer fetch before the 402). The contract attacks are in tests/contracts.
"""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest

from longtail.contracts.anvil import DEV_ACCOUNTS
from longtail.contracts.client import LongtailContracts
from longtail.contracts.deployment import OPEN
from longtail.node.devnet import (
    ADAPTERS,
    CLIENT_ACCOUNT,
    NODE_ACCOUNTS,
    NODE_ADAPTERS,
    PRICE_PER_1K_TOKENS,
)

pytestmark = [pytest.mark.slow, pytest.mark.chain]
PASSWORD = "test-password"
SECOND_CLIENT, STRANGER = 7, 8
BODY = {"model": "reviews-r4", "messages": [{"role": "user", "content": "Comment on an off-by-one."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def deployed_chain(deployed_chain):
    """The devnet chain, with OPEN for a second client."""
    anvil, deployment = deployed_chain[:2]
    LongtailContracts.connect(anvil.w3, deployment).token.mint(DEV_ACCOUNTS[0], DEV_ACCOUNTS[SECOND_CLIENT].address,
                                                               1_000 * OPEN)
    return deployed_chain


async def start_node(tmp, chain_info, shared_model, **extra):
    from longtail.node.config import NodeConfig
    from longtail.node.runner import open_node

    anvil, _, deployment_file, _ = chain_info
    engine, tokenizer = shared_model
    config = NodeConfig(**{"max_waiting_requests": 8, **extra}, name="node-b", home=tmp / "node-b", http_port=0,
                        chain_rpc=anvil.url, deployment=deployment_file,
                        adapters=tuple(str(ADAPTERS / a) for a in NODE_ADAPTERS["node-b"]),
                        price_per_1k_tokens=PRICE_PER_1K_TOKENS, checkpoint_every_receipts=10_000,
                        checkpoint_every_seconds=3600.0, redeem_min_amount=1, max_prompt_tokens=256,
                        max_tokens_limit=64)
    return await open_node(config, bytes(DEV_ACCOUNTS[NODE_ACCOUNTS["node-b"]].key), engine, tokenizer)


def client_for(tmp, chain_info, index=CLIENT_ACCOUNT):
    from longtail.node.client import PayingClient

    anvil, deployment, _, _ = chain_info
    return PayingClient(DEV_ACCOUNTS[index], anvil.url, deployment, tmp / f"client-{index}")


async def post(session, url, body, headers):
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, await response.json()


def run_with_node(tmp_path, chain, shared_model, monkeypatch, scenario, **extra):
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)

    async def main():
        running = await start_node(tmp_path, chain, shared_model, **extra)
        try:
            async with aiohttp.ClientSession() as session:
                await scenario(running, session)
        finally:
            await running.stop()

    asyncio.run(main())


# --- attack 1: the node's payCumulative ------------------------------------------------------------------

def test_a_node_cannot_make_the_client_sign_for_more_than_it_verified(tmp_path, chain, shared_model, monkeypatch):
    client = client_for(tmp_path, chain)
    deposit = 10**18

    async def scenario(running, session):
        node = running.node
        channel = await asyncio.to_thread(client.ensure_deposit, node.address, deposit, deposit)
        honest_field = node._longtail_field

        def greedy(signed):  # the attack: one cheap answer, and "you owe the whole deposit"
            return {**honest_field(signed), "payCumulative": str(deposit)}

        monkeypatch.setattr(node, "_longtail_field", greedy)
        answer = await client.ask(session, running.url, "reviews-r4", "Review a lock held during I/O.", 4)
        price = answer.receipt.receipt.price
        assert 0 < price < deposit
        assert client.state.paid(channel) == price
        assert client.overcharges == [(running.url, deposit, price)]
        # What the client signs and sends is what it verified, not what the node asked for.
        assert await client.settle(session, running.url) == price
        assert node.payments._accounts[channel].paid == price
        # Top-ups follow the client's own count too: nothing is deposited for the node's claim.
        await asyncio.to_thread(client.ensure_deposit, node.address, deposit - price, deposit)
        assert client.contracts.channels.get_channel(channel).deposit == deposit

        # A receipt priced above the adapter's registered price is refused and not counted.
        monkeypatch.setattr(node, "_longtail_field", honest_field)
        import longtail.node.service as service

        real_price = service.price_for_tokens
        monkeypatch.setattr(service, "price_for_tokens", lambda per_1k, tokens: 10 * real_price(per_1k, tokens))
        from longtail.node.client import ClientError

        with pytest.raises(ClientError, match="not paid"):
            await client.ask(session, running.url, "reviews-r4", "Review a retry loop.", 4)
        assert client.state.paid(channel) == price

    run_with_node(tmp_path, chain, shared_model, monkeypatch, scenario)


# --- attack 8: billing a stranger's channel --------------------------------------------------------------

def test_nobody_but_the_channels_client_can_spend_it(tmp_path, chain, shared_model, monkeypatch):
    victim = client_for(tmp_path, chain)
    stranger = client_for(tmp_path, chain, STRANGER)

    async def scenario(running, session):
        node, url = running.node, running.url
        channel = await asyncio.to_thread(victim.ensure_deposit, node.address, 10**18, 10**18)
        size = node.receipt_log.size
        # The attack: the victim's public channel id and nothing else.
        status, error = await post(session, url, BODY, {"X-Longtail-Channel": channel})
        assert status == 402, error
        # The stranger signs the request with its own key.
        status, error = await post(session, url, BODY, {"X-Longtail-Channel": channel,
                                                        **stranger.authorize(channel, BODY).headers()})
        assert status == 401 and "not signed by the channel's client" in error["error"]["message"]
        # The victim's authorization of one request does not pay for another one.
        other = {**BODY, "max_tokens": 64}
        status, _ = await post(session, url, other, {"X-Longtail-Channel": channel,
                                                     **victim.authorize(channel, BODY).headers()})
        assert status == 401
        # Nor a second time: the victim's own request goes through once, a replay of it does not.
        signed = {"X-Longtail-Channel": channel, **victim.authorize(channel, BODY).headers()}
        status, _ = await post(session, url, BODY, signed)
        assert status == 200
        status, error = await post(session, url, BODY, signed)
        assert status == 401 and "already used" in error["error"]["message"]
        assert node.receipt_log.size == size + 1
        # An expired authorization (or one valid for hours) is refused.
        from longtail.attribution.receipts import keccak
        from longtail.contracts.vouchers import VoucherSigner
        from longtail.node.client import prompt_text_of
        from longtail.node.vouchers import sign_request_authorization

        prompt_hash = keccak(prompt_text_of(BODY).encode("utf-8"))
        stale = sign_request_authorization(VoucherSigner(victim.vouchers, victim.account.key), channel, BODY["model"],
                                           prompt_hash, BODY["max_tokens"], expires_at=1)
        status, _ = await post(session, url, BODY, {"X-Longtail-Channel": channel, **stale.headers()})
        assert status == 402
        assert node.receipt_log.size == size + 1
        # Every receipt on the victim's channel is one the victim asked for.
        assert node.payments._accounts[channel].owed == node.receipt_log.get(size).receipt.price

    run_with_node(tmp_path, chain, shared_model, monkeypatch, scenario)


# --- attack 10: unpaid work ---------------------------------------------------------------------------------

def test_an_unpaid_request_makes_the_node_fetch_nothing(tmp_path, chain, shared_model, monkeypatch):
    client = client_for(tmp_path, chain)
    legal = chain[3]["legal-r8"]  # registered on chain, not served by node-b

    async def scenario(running, session):
        node, url = running.node, running.url
        fetched = []

        async def spy(adapter_id):
            fetched.append(adapter_id)
            raise AssertionError("the node fetched an adapter for a request nobody paid for")

        node.adapter_fetcher = spy
        channel = await asyncio.to_thread(client.ensure_deposit, node.address, 10**18, 10**18)
        body = {**BODY, "model": legal}
        for headers in ({}, {"X-Longtail-Channel": channel}):
            status, _ = await post(session, url, body, headers)
            assert status == 402
        assert fetched == []

    run_with_node(tmp_path, chain, shared_model, monkeypatch, scenario)


# --- attack 9: credit on a cold channel ------------------------------------------------------------------------

def test_a_cold_channel_gets_no_more_concurrent_credit_than_a_warm_one(tmp_path, chain, shared_model, monkeypatch):
    client = client_for(tmp_path, chain)

    async def scenario(running, session):
        node, url = running.node, running.url
        channel = await asyncio.to_thread(client.ensure_deposit, node.address, 10**18, 10**18)
        assert channel not in node.payments._chain_cache  # cold: the node has never read this channel
        generate, running_now, peak = node.generation.generate, [0], [0]

        async def slow_generate(*args):  # every admitted request stays in flight long enough to overlap the others
            running_now[0] += 1
            peak[0] = max(peak[0], running_now[0])
            try:
                await asyncio.sleep(1.0)
                return await generate(*args)
            finally:
                running_now[0] -= 1

        monkeypatch.setattr(node.generation, "generate", slow_generate)
        bodies = [{**BODY, "messages": [{"role": "user", "content": f"Request {i}."}]} for i in range(14)]
        results = await asyncio.gather(*(post(session, url, b, client._voucher_headers(channel, b)) for b in bodies))
        statuses = sorted(status for status, _ in results)
        assert peak[0] <= 8 and statuses.count(200) == 8 and statuses.count(429) == 6, (peak, statuses)
        # Never more credit than the deposit, and the node holds a receipt for each answer it gave.
        account = node.payments._accounts[channel]
        assert account.reserved == 0
        assert account.owed == sum(int(body["longtail"]["receipt"]["price"]) for s, body in results if s == 200)

    run_with_node(tmp_path, chain, shared_model, monkeypatch, scenario)


# --- attack 3: a refunded channel ------------------------------------------------------------------------------

def test_a_refunded_channel_is_not_served_from_an_old_view(tmp_path, chain, shared_model, monkeypatch):
    client = client_for(tmp_path, chain)
    anvil = chain[0]

    async def scenario(running, session):
        node, url = running.node, running.url
        node.payments.max_view_seconds = 0.5
        node.payments._cache_seconds = 0.5
        channel = await asyncio.to_thread(client.ensure_deposit, node.address, 10**18, 10**18)
        answer = await client.ask(session, url, "reviews-r4", "Say hi.", 4)
        await client.settle(session, url)
        contracts = client.contracts
        # The client thaws and withdraws; the node's view of the channel is from before.
        await asyncio.to_thread(contracts.channels.start_withdraw, client.account, channel)
        # The node redeems what it holds as soon as it sees the withdrawal start (event watch).
        assert await running.checkpointer.watch_withdrawals() == [channel]
        await asyncio.to_thread(anvil.increase_time, contracts.channels.thaw_period() + 1)
        refund = await asyncio.to_thread(contracts.channels.finish_withdraw, client.account, channel)
        assert contracts.channels.get_channel(channel).redeemed == answer.receipt.receipt.price
        assert refund == 10**18 - answer.receipt.receipt.price
        await asyncio.sleep(0.6)
        # The attack: keep asking on the refunded channel.
        status, error = await post(session, url, BODY, client._voucher_headers(channel, BODY))
        assert status == 402, error

    run_with_node(tmp_path, chain, shared_model, monkeypatch, scenario)


# --- attack 4: one dead channel -----------------------------------------------------------------------------------

def test_one_dead_channel_does_not_stop_settlement(tmp_path, chain, shared_model, monkeypatch):
    alive = client_for(tmp_path, chain)
    dead = client_for(tmp_path, chain, SECOND_CLIENT)
    anvil = chain[0]

    async def scenario(running, session):
        node, url = running.node, running.url
        dead_channel = await asyncio.to_thread(dead.ensure_deposit, node.address, 10**17, 10**17)
        alive_channel = await asyncio.to_thread(alive.ensure_deposit, node.address, 10**17, 10**17)
        for client in (dead, alive):
            await client.ask(session, url, "reviews-r4", "Name a sorting algorithm.", 4)
            await client.settle(session, url)
        # The dead channel's client withdraws everything before the node redeems (the node's watcher is off).
        channels = dead.contracts.channels
        await asyncio.to_thread(channels.start_withdraw, dead.account, dead_channel)
        await asyncio.to_thread(anvil.increase_time, channels.thaw_period() + 1)
        await asyncio.to_thread(channels.finish_withdraw, dead.account, dead_channel)
        # The node read the dead channel before the refund (a view from before the withdrawal, as in a race): its
        # redeem reverts on chain.
        chain_gateway = running.checkpointer.chain
        real_read = chain_gateway.read_channel

        async def read_before_refund(channel_id):
            state = await real_read(channel_id)
            if channel_id == dead_channel:
                return dataclasses.replace(state, deposit=10**17)
            return state

        monkeypatch.setattr(chain_gateway, "read_channel", read_before_refund)
        result = await running.checkpointer.run_round()
        # The alive channel is redeemed, the dead one parked with its reason, and the checkpoint is posted.
        assert channels.get_channel(alive_channel).redeemed == alive.state.paid(alive_channel)
        assert "ChannelExhausted" in running.checkpointer.parked[dead_channel][1]
        assert result.epoch == 1 and result.posted_size >= 1
        # The next round does not trip over it again (parked: not even retried).
        assert (await running.checkpointer.run_round()).redeemed == 0

    run_with_node(tmp_path, chain, shared_model, monkeypatch, scenario)
