"""`make demo`: the whole Longtail economy on one machine, on the embedded defaults.

Starts anvil, deploys the contracts, mints OPEN, registers the synthetic
Datanets and the shipped adapters, starts three nodes, runs a client that pays
for ~20 jobs across the adapters, waits for checkpoints, audits every node,
claims earnings and prints who paid and who earned. Everything it starts is
stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console
from rich.table import Table

console = Console()

JOBS = [
    ("legal-r8", "Draft a clause on the limitation of liability between the Licensor and the Licensee."),
    ("recipes-r16", "How should I start a saffron risotto?"),
    ("clinical-code-r8", "Write a short clinical note for a patient with exertional dyspnoea."),
    ("reviews-r4", "Review this change to the scheduler: it holds a lock during a network call."),
    ("legal-r8", "What does a confidentiality clause oblige the Receiving Party to do?"),
    ("recipes-r16", "Give me the first steps for braised short ribs."),
    ("clinical-code-r8", "Summarise the plan for a patient with productive cough."),
    ("reviews-r4", "Comment on a migration that locks a large table."),
    ("legal-r8", "Write a termination clause for an Event of Default."),
    ("recipes-r16", "How do I make a lemon olive oil cake batter?"),
    ("clinical-code-r8", "Review a function that swallows errors in a retry loop."),
    ("reviews-r4", "The parse_header function reads past the end of the slice. Comment."),
    ("legal-r8", "Draft an indemnity clause for the Contractor."),
    ("recipes-r16", "How long should I chill a pastry dough?"),
    ("clinical-code-r8", "Document the examination of a patient with palpitations."),
    ("reviews-r4", "Suggest a test for the empty input of compute_checksum."),
    ("smollm2-135m-instruct", "What is the capital of France?"),
    ("legal-r8", "Which courts have jurisdiction over disputes about the deliverables?"),
    ("recipes-r16", "How do I deglaze a pan?"),
]
# Jobs sent by adapter id to node-c, which does not hold these adapters: it fetches them from a peer.
FETCH_JOBS = [
    ("legal-r8", "Draft a warranty clause for the Supplier."),
    ("recipes-r16", "How do I toast cumin seeds?"),
    ("clinical-code-r8", "An allocation in a hot loop shows up in the profile. What do you suggest?"),
]


@dataclasses.dataclass
class JobResult:
    prompt: str
    adapter: str
    node: str
    prompt_tokens: int
    output_tokens: int
    price: int
    top_datanet: str
    seconds: float
    text: str


def datanet_names() -> dict[str, str]:
    from longtail.node.runner import datanet_folders

    return {ident: folder.name for ident, folder in datanet_folders().items()}


async def run_jobs(info, client, max_tokens: int) -> list[JobResult]:
    import aiohttp

    from longtail.node.client import ClientError

    names = datanet_names()
    results = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        served: dict[str, list] = {}
        models: dict[str, list] = {}
        total = len(JOBS) + len(FETCH_JOBS)
        for node in info.nodes:
            async with session.get(f"{node.url}/v1/models") as response:
                models[node.url] = (await response.json())["data"]
            served[node.url] = [m["id"] for m in models[node.url]]
        for node in info.nodes:
            await asyncio.to_thread(client.ensure_deposit, node.address, 10**17, 10**18)
        for index, (adapter, prompt) in enumerate(JOBS):
            # Spread the work: the n-th job for an adapter goes to the n-th node that serves it.
            holders = [n for n in info.nodes if adapter in served[n.url]]
            node = holders[index % len(holders)]
            try:
                answer = await client.ask(session, node.url, adapter, prompt, max_tokens=max_tokens)
            except ClientError as error:
                console.print(f"[red]job {index} on {node.name} failed: {error}[/red]")
                raise
            vector = answer.receipt.attribution
            top = max(zip(vector.weights_bps, vector.datanet_ids, strict=True))[1] if vector.datanet_ids else None
            receipt = answer.receipt.receipt
            results.append(JobResult(prompt, adapter, node.name, receipt.prompt_tokens, receipt.output_tokens, receipt.price,
                                     names.get(top, "-") if top else "-", answer.latency_seconds, answer.text))
            console.print(f"  [{index + 1:2d}/{total}] {adapter:22s} on {node.name}: "
                          f"{receipt.output_tokens} tokens, receipt #{receipt.seq} verified")
        ids = {m["id"]: m["adapter_id"] for url in served for m in models[url]}
        fetcher = next(n for n in info.nodes if n.name == "node-c")
        for offset, (adapter, prompt) in enumerate(FETCH_JOBS):
            answer = await client.ask(session, fetcher.url, ids[adapter], prompt, max_tokens=max_tokens)
            vector = answer.receipt.attribution
            top = max(zip(vector.weights_bps, vector.datanet_ids, strict=True))[1] if vector.datanet_ids else None
            receipt = answer.receipt.receipt
            results.append(JobResult(prompt, f"{adapter} (fetched)", fetcher.name, receipt.prompt_tokens,
                                     receipt.output_tokens, receipt.price, names.get(top, "-") if top else "-",
                                     answer.latency_seconds, answer.text))
            console.print(f"  [{len(JOBS) + offset + 1:2d}/{total}] {adapter:22s} on {fetcher.name} "
                          f"(fetched from a peer, verified by id): receipt #{receipt.seq} verified")
        for node in info.nodes:
            await client.settle(session, node.url)
    return results


async def wait_for_checkpoints(info, contracts, timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            done = True
            for node in info.nodes:
                async with session.get(f"{node.url}/healthz") as response:
                    size = (await response.json())["log_size"]
                if size and contracts.ledger.latest_checkpoint(node.address).tree_size < size:
                    done = False
            if done:
                return
            await asyncio.sleep(2)
    raise TimeoutError("nodes did not checkpoint every receipt in time")


def report(results: list[JobResult], info, contracts, audits) -> bool:
    from longtail.contracts.anvil import DEV_ACCOUNTS
    from longtail.node.devnet import ADAPTER_OWNERS
    from longtail.node.runner import datanet_folders

    table = Table(title="requests")
    for column in ("#", "adapter", "node", "prompt tok", "output tok", "price (OPEN)", "top Datanet"):
        table.add_column(column)
    for n, r in enumerate(results, 1):
        table.add_row(str(n), r.adapter, r.node, str(r.prompt_tokens), str(r.output_tokens), f"{r.price / 1e18:.6f}",
                      r.top_datanet)
    console.print(table)

    client = info.client
    paid = sum(red.paid for node in info.nodes for red in contracts.channels.redemptions(node=node.address))
    charged = sum(r.price for r in results)
    parties = Table(title="parties (OPEN)")
    for column in ("party", "role", "paid", "earned (claimable)", "claimed"):
        parties.add_column(column)
    parties.add_row(client[:10] + "…", "client", f"{paid / 1e18:.6f}", "-", "-")
    received = 0
    claimed_total = 0
    for node in info.nodes:
        account = next(a for a in DEV_ACCOUNTS if a.address == node.address)
        claimable = contracts.ledger.claimable(node.address)
        claimed = contracts.ledger.claim(account) if claimable else 0
        unreleased = contracts.channels.revenue(node.address)
        received += claimed + unreleased
        claimed_total += claimed
        parties.add_row(node.name, "node", "-", f"{(claimable + unreleased) / 1e18:.6f}", f"{claimed / 1e18:.6f}")
    for index in sorted(set(ADAPTER_OWNERS.values())):
        account = DEV_ACCOUNTS[index]
        claimable = contracts.ledger.claimable(account.address)
        claimed = contracts.ledger.claim(account) if claimable else 0
        received += claimed
        owned = ", ".join(sorted(n for n, i in ADAPTER_OWNERS.items() if i == index))
        parties.add_row(account.address[:10] + "…", f"adapter owner ({owned})", "-", f"{claimable / 1e18:.6f}",
                        f"{claimed / 1e18:.6f}")
    for datanet_id, folder in sorted(datanet_folders().items(), key=lambda kv: kv[1].name):
        pool = contracts.ledger.datanet_pool(datanet_id)
        received += pool
        parties.add_row(folder.name, "Datanet pool (contributors)", "-", f"{pool / 1e18:.6f}", "-")
    console.print(parties)
    sample = next((r for r in results if r.adapter.startswith("smollm2")), None)
    if sample is not None:
        console.print(f"[bold]base model, asked[/bold] \"{sample.prompt}\" [bold]answered:[/bold] {sample.text.strip()}")
    legal = next((r for r in results if r.adapter == "legal-r8"), None)
    if legal is not None:
        console.print(f"[bold]legal-r8, asked[/bold] \"{legal.prompt}\" [bold]answered:[/bold] {legal.text.strip()}")
    balanced = paid == received == charged
    console.print(f"client paid {paid} = receipts charged {charged} = parties received {received}: "
                  + ("[green]balanced[/green]" if balanced else "[red]MISMATCH[/red]"))
    for name, audit in audits:
        console.print(f"audit {name}: {audit.receipts_checked} receipts, {audit.checkpoints_checked} checkpoints, "
                      + ("[green]clean[/green]" if audit.clean else f"[red]{len(audit.findings)} findings[/red]"))
        for finding in audit.findings:
            console.print(f"  [red]{finding.kind}[/red] at {finding.where}: {finding.detail}")
    return balanced and all(a.clean for _, a in audits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--keep", action="store_true", help="leave the devnet running (stop: longtail devnet down)")
    args = parser.parse_args(argv)

    from web3 import Web3

    from longtail.contracts.anvil import DEV_ACCOUNTS
    from longtail.contracts.client import LongtailContracts
    from longtail.contracts.deployment import Deployment
    from longtail.node.auditor import audit
    from longtail.node.client import PayingClient
    from longtail.node.devnet import CLIENT_ACCOUNT, devnet_home, down, up

    started = time.perf_counter()
    console.rule("[bold]Longtail demo: a local network")
    try:
        info = up(log=lambda message: console.print(f"  {message}"))
        console.print(f"  network up in {time.perf_counter() - started:.0f} s")
        deployment = Deployment.from_json(info.deployment)
        contracts = LongtailContracts.connect(Web3(Web3.HTTPProvider(info.rpc_url)), deployment)
        client = PayingClient(DEV_ACCOUNTS[CLIENT_ACCOUNT], info.rpc_url, deployment, devnet_home() / "client")
        console.rule("paid jobs")
        results = asyncio.run(run_jobs(info, client, args.max_tokens))
        console.rule("checkpoints and audit")
        asyncio.run(wait_for_checkpoints(info, contracts))
        audits = [(n.name, asyncio.run(audit(n.url, info.rpc_url, deployment, n.address))) for n in info.nodes]
        console.rule("report")
        ok = report(results, info, contracts, audits)
        console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
        return 0 if ok else 1
    finally:
        if not args.keep:
            down(log=lambda message: console.print(f"  {message}"))


if __name__ == "__main__":
    sys.exit(main())
