"""Load on one paid node over HTTP on loopback: requests/s, latency, and what payment + receipt add.

In one process and one run: (a) the same engine driven directly, unpaid, with
the same concurrency and requests (the baseline), then (b) concurrent paid
clients over HTTP against a node on a real anvil for `--seconds`. It prints
requests/s, p50/p99 latency, the p50 added per request by HTTP + payment +
receipt (target <= 5 ms), errors, and runs the audit afterwards. The table goes
to docs/benchmarks.md between `<!-- node:start -->` and `<!-- node:end -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "benchmarks.md"

from scripts.docs_section import write_section  # noqa: E402

PROMPTS = ["Draft a short clause.", "Name one duty of a tenant.", "What is an indemnity?", "Define venue."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def unpaid_baseline(generation, catalog_entry, requests, concurrency: int) -> list[float]:
    from node.requests import parse_completion

    latencies: list[float] = []
    queue = list(requests)

    async def worker():
        while queue:
            prompt = queue.pop()
            request = parse_completion({"model": "x", "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": 8, "temperature": 0}, chat=True, max_tokens_limit=64)
            started = time.perf_counter()
            ids = generation.encode(request)
            await generation.generate(request, catalog_entry, ids)
            latencies.append(time.perf_counter() - started)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def paid_load(clients, url: str, seconds: float) -> tuple[list[float], int]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(client, index):
        nonlocal errors
        async with aiohttp.ClientSession() as session:
            n = 0
            while time.monotonic() < deadline:
                try:
                    answer = await client.ask(session, url, "legal-r8", PROMPTS[(index + n) % len(PROMPTS)], 8)
                    latencies.append(answer.latency_seconds)
                except Exception as error:  # counted, reported; the load goes on
                    errors += 1
                    print(f"error: {error}", file=sys.stderr)
                n += 1
            await client.settle(session, url)
    await asyncio.gather(*(worker(c, i) for i, c in enumerate(clients)))
    return latencies, errors


async def main_async(args) -> int:
    from contracts.anvil import DEV_ACCOUNTS, Anvil
    from contracts.deployment import OPEN
    from node.auditor import audit
    from node.client import PayingClient
    from node.config import NodeConfig
    from node.devnet import ADAPTERS, setup_chain
    from node.runner import open_node

    os.environ.setdefault("LONGTAIL_KEY_PASSWORD", "bench")
    anvil = Anvil().start()
    tmp = Path(tempfile.mkdtemp(prefix="longtail-bench-"))
    try:
        deployment, _ = setup_chain(anvil.w3, log=lambda *_: None)
        deployment.save(tmp / "deployment.json")
        config = NodeConfig(name="bench", home=tmp / "node", http_port=0, chain_rpc=anvil.url,
                            deployment=tmp / "deployment.json", adapters=(str(ADAPTERS / "legal-r8"),),
                            checkpoint_every_receipts=10**9, checkpoint_every_seconds=10**6,
                            max_waiting_requests=256)
        running = await open_node(config, bytes(DEV_ACCOUNTS[1].key))
        entry = running.node.catalog.resolve("legal-r8")
        requests = [PROMPTS[i % len(PROMPTS)] for i in range(args.baseline_requests)]
        await unpaid_baseline(running.node.generation, entry, requests[:2], 1)  # warm-up
        started = time.perf_counter()
        base = await unpaid_baseline(running.node.generation, entry, requests, args.clients)
        base_seconds = time.perf_counter() - started
        clients = []
        for i in range(args.clients):
            account = DEV_ACCOUNTS[4 + i % 6]
            from contracts.client import LongtailContracts

            LongtailContracts.connect(anvil.w3, deployment).token.mint(DEV_ACCOUNTS[0], account.address, 1000 * OPEN)
            client = PayingClient(account, anvil.url, deployment, tmp / f"client-{i}")
            await asyncio.to_thread(client.ensure_deposit, running.node.address, 10**18, 10**19)
            clients.append(client)
        paid, errors = await paid_load(clients, running.url, args.seconds)
        await running.checkpointer.run_round()
        report = await audit(running.url, anvil.url, deployment)
        await running.stop()
    finally:
        anvil.stop()
    added = statistics.median(paid) - statistics.median(base)
    rows = [
        ("unpaid engine, direct", len(base), f"{len(base) / base_seconds:.2f}",
         f"{1000 * percentile(base, 0.5):.0f}", f"{1000 * percentile(base, 0.99):.0f}", 0),
        ("paid over HTTP", len(paid), f"{len(paid) / args.seconds:.2f}",
         f"{1000 * percentile(paid, 0.5):.0f}", f"{1000 * percentile(paid, 0.99):.0f}", errors),
    ]
    table = "\n".join([
        f"## Node under load ({args.clients} concurrent clients, 8 output tokens, embedded model, this CPU)",
        "", "| run | requests | req/s | p50 ms | p99 ms | errors |", "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {' | '.join(str(c) for c in row)} |" for row in rows], "",
        f"HTTP + payment + receipt add **{1000 * added:.1f} ms** at p50 per request "
        f"(ratio paid/unpaid p50 = {statistics.median(paid) / statistics.median(base):.3f}); "
        f"audit after the run: {'clean' if report.clean else f'{len(report.findings)} findings'} "
        f"({report.receipts_checked} receipts).",
    ])
    print(table)
    write_section(DOC, "node", table)
    return 0 if report.clean and errors == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--baseline-requests", type=int, default=24)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
