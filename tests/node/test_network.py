"""Three nodes on loopback with a real anvil: paid requests, receipts, checkpoints, audits, restarts.

The embedded base model and the shipped adapters run for real; one engine is
shared by the three in-process nodes to keep memory and time down (each node
still has its own key, receipt log, payment intake and HTTP server).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from longtail.contracts.anvil import DEV_ACCOUNTS, Anvil
from longtail.contracts.client import LongtailContracts
from longtail.node.devnet import (
    ADAPTERS,
    CLIENT_ACCOUNT,
    NODE_ACCOUNTS,
    NODE_ADAPTERS,
    PRICE_PER_1K_TOKENS,
    setup_chain,
)

pytestmark = [pytest.mark.slow, pytest.mark.chain]
PASSWORD = "test-password"


def node_config(tmp: Path, name: str, deployment_file: Path, rpc_url: str, **extra):
    from longtail.node.config import NodeConfig

    return NodeConfig(**extra, name=name, home=tmp / name, http_port=0, chain_rpc=rpc_url, deployment=deployment_file,
                      adapters=tuple(str(ADAPTERS / a) for a in NODE_ADAPTERS[name]),
                      price_per_1k_tokens=PRICE_PER_1K_TOKENS, checkpoint_every_receipts=10_000,
                      checkpoint_every_seconds=3600.0, redeem_min_amount=1, max_prompt_tokens=256,
                      max_tokens_limit=64)


async def start_nodes(tmp, chain_info, shared_model, names=("node-a", "node-b", "node-c"), **extra):
    from longtail.node.runner import open_node

    anvil, _, deployment_file, _ = chain_info
    engine, tokenizer = shared_model
    return {name: await open_node(node_config(tmp, name, deployment_file, anvil.url, **extra),
                                  bytes(DEV_ACCOUNTS[NODE_ACCOUNTS[name]].key), engine, tokenizer)
            for name in names}


def make_client(tmp, chain_info):
    from longtail.node.client import PayingClient

    anvil, deployment, _, _ = chain_info
    return PayingClient(DEV_ACCOUNTS[CLIENT_ACCOUNT], anvil.url, deployment, tmp / "client")


async def stop_all(nodes):
    for running in nodes.values():
        await running.stop()


def test_paid_requests_checkpoint_and_a_clean_audit(tmp_path, chain, shared_model, monkeypatch):
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)
    anvil, deployment, _, adapter_ids = chain
    from longtail.node.auditor import audit

    async def scenario():
        nodes = await start_nodes(tmp_path, chain, shared_model, ("node-a",))
        client = make_client(tmp_path, chain)
        node_a = nodes["node-a"]
        try:
            await asyncio.to_thread(client.ensure_deposit, node_a.node.address, 10**17, 10**18)
            async with aiohttp.ClientSession() as session:
                first = await client.ask(session, node_a.url, "legal-r8", "Draft a liability clause.", 8)
                second = await client.ask(session, node_a.url, adapter_ids["recipes-r16"], "How to start risotto?", 8)
                assert (first.receipt.receipt.seq, second.receipt.receipt.seq) == (0, 1)
                assert first.receipt.receipt.adapter_id == adapter_ids["legal-r8"]
                assert first.receipt.attribution.datanet_ids, "an adapter trained on Datanets attributes to them"
                assert {"engine", "payment", "receipt", "total"} <= first.server_timing.keys()
                assert first.server_timing["engine"] < first.server_timing["total"] < 1000 * first.latency_seconds
                # The stored body is the answer's, whole: nothing is added to it after the answer left.
                stored = await client.fetch_receipt(session, node_a.url, first.receipt.receipt.request_id)
                assert stored.to_canonical_json() == first.receipt.to_canonical_json()
                async with session.get(f"{node_a.url}/v1/receipts", params={"from_seq": 0, "to_seq": 1}) as response:
                    listed = (await response.json())["receipts"][0]
                assert "adapterCredit" not in listed
                assert listed["attribution"]["evidence"]["outputTokens"] == first.receipt.receipt.output_tokens
                base = await client.ask(session, node_a.url, "smollm2-135m-instruct", "Say hello.", 4)
                assert int(base.receipt.receipt.adapter_id, 16) == 0 and not base.receipt.attribution.datanet_ids
                await client.settle(session, node_a.url)
                result = await node_a.checkpointer.run_round()
                assert result.posted_size == 3 and result.epoch == 1
                assert await client.check_inclusion(session, node_a.url, first.receipt) is True
                async with session.get(f"{node_a.url}/metrics") as response:
                    assert "longtail_receipts_total 3.0" in await response.text()
                async with session.get(f"{node_a.url}/") as response:
                    page = await response.text()
                assert "legal-r8" in page and first.receipt.receipt.request_id[:10] in page
            report = await audit(node_a.url, anvil.url, deployment)
            assert report.clean, report.findings
            assert (report.receipts_checked, report.checkpoints_checked) == (3, 1)
            contracts = LongtailContracts.connect(anvil.w3, deployment)
            paid = sum(r.paid for r in contracts.channels.redemptions(node=node_a.node.address))
            assert paid == sum(a.receipt.receipt.price for a in (first, second, base))
        finally:
            await stop_all(nodes)

    asyncio.run(scenario())


def test_bad_requests_get_clear_errors_and_the_node_keeps_serving(tmp_path, chain, shared_model, monkeypatch):
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)

    async def scenario():
        nodes = await start_nodes(tmp_path, chain, shared_model, ("node-b",))
        client = make_client(tmp_path, chain)
        url = nodes["node-b"].url
        address = nodes["node-b"].node.address
        try:
            channel = await asyncio.to_thread(client.ensure_deposit, address, 10**17, 10**18)
            body = {"model": "reviews-r4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            async with aiohttp.ClientSession() as session:
                async def post(payload, headers=None):
                    async with session.post(f"{url}/v1/chat/completions", json=payload, headers=headers or {}) as r:
                        return r.status, await r.json()

                status, error = await post(body)
                assert status == 402 and "X-Longtail-Channel" in error["error"]["message"]
                nope = {**body, "model": "nope"}
                status, error = await post(nope, client._voucher_headers(channel, nope))
                assert status == 404 and error["error"]["code"] == "model_not_found"
                long = {**body, "messages": [{"role": "user", "content": "word " * 400}]}
                status, error = await post(long, client._voucher_headers(channel, long))
                assert status == 400 and error["error"]["code"] == "prompt_too_large"
                forged = {**client._voucher_headers(channel, body), "X-Longtail-Voucher-Amount": "5",
                          "X-Longtail-Voucher-Signature": "0x" + "11" * 65}
                status, error = await post(body, forged)
                assert status == 401
                status, _ = await post({**body, "max_tokens": "many"}, {"X-Longtail-Channel": channel})
                assert status == 400
                answer = await client.ask(session, url, "reviews-r4", "Review a lock held during I/O.", 6)
                assert answer.receipt.receipt.seq == 0
        finally:
            await stop_all(nodes)

    asyncio.run(scenario())


def test_openai_client_works_with_payment_headers(tmp_path, chain, shared_model, monkeypatch):
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)
    import openai

    async def scenario():
        nodes = await start_nodes(tmp_path, chain, shared_model, ("node-c",))
        client = make_client(tmp_path, chain)
        running = nodes["node-c"]
        try:
            channel = await asyncio.to_thread(client.ensure_deposit, running.node.address, 10**17, 10**18)
            api = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="unused")
            first = {"model": "reviews-r4", "messages": [{"role": "user", "content": "Comment on an off-by-one."}],
                     "max_tokens": 6}
            # Every paid request carries the client's signed authorization of it (docs/security.md).
            completion = await api.chat.completions.create(**first,
                                                           extra_headers=client._voucher_headers(channel, first))
            assert completion.choices[0].message.content
            assert completion.model_extra["longtail"]["receipt"]["seq"] == 0
            # The second request must carry a voucher for what the first one cost.
            client.state.add_charge(channel, int(completion.model_extra["longtail"]["receipt"]["price"]))
            second = {"model": "reviews-r4", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
            stream = await api.chat.completions.create(**second, stream=True,
                                                       extra_headers=client._voucher_headers(channel, second))
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].model_extra["longtail"]["receipt"]["seq"] == 1
            await api.close()
        finally:
            await stop_all(nodes)

    asyncio.run(scenario())


def test_edited_receipt_is_flagged_and_restart_loses_nothing(tmp_path, chain, shared_model, monkeypatch):
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)
    anvil, deployment, _, _ = chain
    from longtail.node.auditor import audit

    async def scenario():
        nodes = await start_nodes(tmp_path, chain, shared_model, ("node-a",))
        client = make_client(tmp_path, chain)
        url = nodes["node-a"].url
        address = nodes["node-a"].node.address
        await asyncio.to_thread(client.ensure_deposit, address, 10**17, 10**18)
        async with aiohttp.ClientSession() as session:
            for prompt in ("One clause.", "Another clause."):
                await client.ask(session, url, "legal-r8", prompt, 6)
            await client.settle(session, url)
        await nodes["node-a"].checkpointer.run_round()
        size_before = nodes["node-a"].node.receipt_log.size
        await stop_all(nodes)

        restarted = await start_nodes(tmp_path, chain, shared_model, ("node-a",))
        url = restarted["node-a"].url
        try:
            assert restarted["node-a"].node.receipt_log.size == size_before
            async with aiohttp.ClientSession() as session:
                answer = await client.ask(session, url, "legal-r8", "A third clause.", 6)
                assert answer.receipt.receipt.seq == size_before
            assert (await audit(url, anvil.url, deployment)).clean
        finally:
            await stop_all(restarted)
        database = tmp_path / "node-a" / "node.sqlite"
        with sqlite3.connect(database) as connection:
            body = json.loads(connection.execute("select body from receipts where seq = 1").fetchone()[0])
            body["receipt"]["price"] = "1"
            connection.execute("update receipts set body = ? where seq = 1", (json.dumps(body),))
        tampered = await start_nodes(tmp_path, chain, shared_model, ("node-a",))
        try:
            report = await audit(tampered["node-a"].url, anvil.url, deployment)
            assert not report.clean
            assert any(f.where == "seq 1" for f in report.findings), report.findings
        finally:
            await stop_all(tampered)

    asyncio.run(scenario())


def test_web_page_shows_the_nodes_data_in_headless_chromium(tmp_path, chain, shared_model, monkeypatch):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (make test installs it with apt-get)")
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)

    async def scenario():
        nodes = await start_nodes(tmp_path, chain, shared_model, ("node-a",))
        client = make_client(tmp_path, chain)
        running = nodes["node-a"]
        try:
            await asyncio.to_thread(client.ensure_deposit, running.node.address, 10**17, 10**18)
            async with aiohttp.ClientSession() as session:
                answer = await client.ask(session, running.url, "legal-r8", "Draft a clause.", 6)
                await client.settle(session, running.url)
            await running.checkpointer.run_round()
            profile = tmp_path / "chromium-profile"
            done = await asyncio.to_thread(subprocess.run, [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--dump-dom", f"{running.url}/"],
                capture_output=True, text=True, timeout=90)
            return answer, done
        finally:
            await stop_all(nodes)

    answer, done = asyncio.run(scenario())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'id="adapters"' in dom and "legal-r8" in dom
    assert answer.receipt.receipt.request_id[:10] in dom, "the recent request and its receipt are listed"
    assert "legal-clauses" in dom, "the top Datanet of the attribution is shown by name"
    assert 'id="checkpoints"' in dom and "epoch" in dom.lower()


def test_paid_request_and_adapter_fetch_over_libp2p(tmp_path, chain, shared_model, monkeypatch):
    """node-c bootstraps to node-a, learns from its signed announcement that it holds legal-r8, fetches the
    adapter over libp2p (HTTP fetching off), and a client pays node-a for an answer over libp2p."""
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)
    _, _, _, adapter_ids = chain
    from longtail.node.p2p import P2PNode

    async def scenario():
        first = await start_nodes(tmp_path, chain, shared_model, ("node-a",), announce_ttl_seconds=3.0)
        node_a = first["node-a"]
        later = await start_nodes(tmp_path, chain, shared_model, ("node-c",), announce_ttl_seconds=3.0,
                                  bootstrap=tuple(node_a.p2p.addrs), fetch_from_registry_peers=False)
        node_c = later["node-c"]
        client_peer = P2PNode(bytes(DEV_ACCOUNTS[CLIENT_ACCOUNT].key), timeout=60)
        await asyncio.to_thread(client_peer.start, asyncio.get_running_loop())
        client = make_client(tmp_path, chain)
        try:
            for _ in range(60):
                if node_c.p2p.directory.find_peers(adapter_ids["legal-r8"]):
                    break
                await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as session:
                await asyncio.to_thread(client.ensure_deposit, node_c.node.address, 10**17, 10**18)
                fetched = await client.ask(session, node_c.url, adapter_ids["legal-r8"], "Draft a clause.", 6)
            assert fetched.receipt.receipt.adapter_id == adapter_ids["legal-r8"]
            channel = await asyncio.to_thread(client.ensure_deposit, node_a.node.address, 10**17, 10**18)
            await client_peer.connect(node_a.p2p.addrs[0])
            body = {"model": "legal-r8", "messages": [{"role": "user", "content": "A clause."}], "max_tokens": 6}
            reply = await client_peer.infer(node_a.node.peer_id, {
                "path": "/v1/chat/completions", "headers": client._voucher_headers(channel, body), "body": body})
            assert reply["status"] == 200, reply
            from longtail.attribution.receipts import SignedReceipt, verify_receipt

            signed = SignedReceipt.from_json(reply["body"]["longtail"])
            assert verify_receipt(signed, client.domain) == node_a.node.address
            unpaid = await client_peer.infer(node_a.node.peer_id, {"body": {"model": "legal-r8", "messages": [
                {"role": "user", "content": "again"}]}})
            assert unpaid["status"] == 402
        finally:
            await asyncio.to_thread(client_peer.stop)
            await stop_all(later)
            await stop_all(first)

    asyncio.run(scenario())


def test_chain_stopped_and_restarted_checkpoints_resume(tmp_path, shared_model, monkeypatch):
    """While anvil is down a checkpoint round fails with ChainError and loses nothing; after anvil comes back
    (same port, state reloaded) the next round posts every paid receipt and the audit is clean."""
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", PASSWORD)
    from longtail.node.auditor import audit
    from longtail.node.chain import ChainError

    anvil = Anvil().start()  # its own chain: this test stops it
    deployment, adapter_ids = setup_chain(anvil.w3, log=lambda *_: None)
    deployment.save(tmp_path / "deployment.json")
    chain = (anvil, deployment, tmp_path / "deployment.json", adapter_ids)

    async def scenario():
        nodes = await start_nodes(tmp_path, chain, shared_model, ("node-a",))
        running = nodes["node-a"]
        client = make_client(tmp_path, chain)
        try:
            await asyncio.to_thread(client.ensure_deposit, running.node.address, 10**17, 10**18)
            async with aiohttp.ClientSession() as session:
                for prompt in ("First clause.", "Second clause."):
                    await client.ask(session, running.url, "legal-r8", prompt, 6)
                await client.settle(session, running.url)
            state = anvil.w3.provider.make_request("anvil_dumpState", [])["result"]
            anvil.stop()
            with pytest.raises(ChainError):
                await running.checkpointer.run_round()
            assert running.node.receipt_log.size == 2
            await asyncio.to_thread(anvil.start)
            anvil.w3.provider.make_request("anvil_loadState", [state])
            result = await running.checkpointer.run_round()
            assert result.posted_size == 2
            report = await audit(running.url, anvil.url, deployment)
            assert report.clean and report.checkpoints_checked == 1, report.findings
        finally:
            await stop_all(nodes)

    try:
        asyncio.run(scenario())
    finally:
        anvil.stop()
