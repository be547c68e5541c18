"""`longtail submit`, `longtail audit`, `longtail claim`: the client's, the auditor's and the earner's commands."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import typer

from longtail.node.output import console, fail, print_json, print_table

KEY_HELP = "keystore file of the account (password in $LONGTAIL_KEY_PASSWORD)"


def _deployment_and_rpc(rpc: str | None, deployment: Path | None):
    from longtail.contracts.deployment import Deployment
    from longtail.node.devnet import DevnetError, load_info

    if rpc and deployment:
        return rpc, Deployment.load(deployment)
    try:
        info = load_info()
    except DevnetError as error:
        fail(f"pass --rpc and --deployment, or start a devnet: {error}", code=2)
    return info.rpc_url, Deployment.from_json(info.deployment)


def _account(keystore: Path | None, dev_account: int | None):
    from eth_account import Account

    from longtail.node.keys import KeystoreError, load_keystore

    if keystore is not None:
        password = os.environ.get("LONGTAIL_KEY_PASSWORD")
        if not password:
            fail("set LONGTAIL_KEY_PASSWORD to open the keystore", code=2)
        try:
            return Account.from_key(load_keystore(keystore, password).private_key)
        except KeystoreError as error:
            fail(str(error), code=2)
    if dev_account is not None:
        from longtail.contracts.anvil import DEV_ACCOUNTS

        return DEV_ACCOUNTS[dev_account]
    fail("pass --keystore (or --dev-account N on a devnet)", code=2)


def submit(
    prompt: str = typer.Argument(..., help="the question"),
    adapter: str = typer.Option(..., "--adapter", help="adapter name or id (or the base model's name)"),
    node: list[str] = typer.Option(None, "--node", help="node URL(s) to try; default: the devnet's nodes"),
    max_tokens: int = typer.Option(48, help="most tokens to generate"),
    deposit: int = typer.Option(10**18, help="OPEN base units to deposit when the channel runs low"),
    keystore: Path = typer.Option(None, help=KEY_HELP),
    dev_account: int = typer.Option(None, help="use anvil's dev account N (devnets only)"),
    rpc: str = typer.Option(None, help="chain RPC URL"),
    deployment: Path = typer.Option(None, help="deployment.json"),
    state: Path = typer.Option(None, help="client state folder (channels, receipts)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Pay a node for one answer: prefers a node that serves the adapter, verifies the receipt."""
    import aiohttp

    from longtail.node.client import ClientError, PayingClient
    from longtail.node.devnet import load_info
    from longtail.serving.base_models import longtail_home

    rpc_url, deployment_info = _deployment_and_rpc(rpc, deployment)
    account = _account(keystore, dev_account if keystore is None and dev_account is not None else
                       (4 if keystore is None else None))
    urls = list(node) if node else [n.url for n in load_info().nodes]
    client = PayingClient(account, rpc_url, deployment_info,
                          state or longtail_home() / "clients" / account.address)

    async def run():
        async with aiohttp.ClientSession() as session:
            candidates = []
            for url in urls:
                try:
                    async with session.get(f"{url}/v1/models") as response:
                        models = (await response.json())["data"]
                except aiohttp.ClientError:
                    continue
                if any(adapter.lower() in (m["id"].lower(), str(m.get("adapter_id")).lower()) for m in models):
                    candidates.append(url)
            if not candidates:
                raise ClientError(f"no reachable node serves {adapter!r}")
            url = candidates[0]
            node_address = await client.node_address(session, url)
            await asyncio.to_thread(client.ensure_deposit, node_address, deposit // 10, deposit)
            return await client.ask(session, url, adapter, prompt, max_tokens)

    try:
        answer = asyncio.run(run())
    except ClientError as error:
        fail(str(error))
    receipt = answer.receipt.receipt
    # A node that asked for more than its verified receipts add up to is reported, never paid (docs/security.md).
    overcharges = [{"node_url": url, "asked": str(asked), "owed": str(owed)} for url, asked, owed in client.overcharges]
    if as_json:
        print_json({"text": answer.text, "node_url": answer.node_url, "receipt": answer.receipt.to_json(),
                    "overcharges": overcharges})
        return
    for row in overcharges:
        console.print(f"[yellow]warning: {row['node_url']} asked for a cumulative {row['asked']}; its verified "
                      f"receipts add up to {row['owed']}, which is all this client signs[/yellow]")
    console.print(answer.text)
    console.print(f"[dim]node {receipt.node} · seq {receipt.seq} · {receipt.output_tokens} tokens · "
                  f"price {receipt.price} · receipt verified[/dim]")


def audit(
    node_url: str = typer.Option(..., "--url", help="the node's HTTP URL"),
    node_address: str = typer.Option(None, "--node", help="the node's address (default: what the URL claims)"),
    rpc: str = typer.Option(None, help="chain RPC URL"),
    deployment: Path = typer.Option(None, help="deployment.json"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Verify a node's receipts, log roots, consistency and payout totals against the chain; exit 1 on any finding."""
    from longtail.node.auditor import audit as run_audit

    rpc_url, deployment_info = _deployment_and_rpc(rpc, deployment)
    report = asyncio.run(run_audit(node_url, rpc_url, deployment_info, node_address))
    if as_json:
        print_json(report.to_json())
    else:
        print_table(f"audit of {report.node}", ["check", "result"],
                    [("receipts verified", report.receipts_checked),
                     ("checkpoints checked", report.checkpoints_checked),
                     ("findings", len(report.findings))])
        for finding in report.findings:
            console.print(f"[red]{finding.kind}[/red] at {finding.where}: {finding.detail}")
    if not report.clean:
        raise typer.Exit(1)


def claim(
    keystore: Path = typer.Option(None, help=KEY_HELP),
    dev_account: int = typer.Option(None, help="use anvil's dev account N (devnets only)"),
    rpc: str = typer.Option(None, help="chain RPC URL"),
    deployment: Path = typer.Option(None, help="deployment.json"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Withdraw what the AttributionLedger holds for this account (node, adapter owner or Datanet owner)."""
    from web3 import Web3

    from longtail.contracts.client import LongtailContracts

    rpc_url, deployment_info = _deployment_and_rpc(rpc, deployment)
    account = _account(keystore, dev_account)
    contracts = LongtailContracts.connect(Web3(Web3.HTTPProvider(rpc_url)), deployment_info)
    claimable = contracts.ledger.claimable(account.address)
    amount = contracts.ledger.claim(account) if claimable else 0
    if as_json:
        print_json({"account": account.address, "claimed": str(amount)})
    else:
        console.print(f"{account.address} claimed {amount} OPEN base units")
