"""Load on one paid node over HTTP on loopback: requests/s, latency, and what payment + receipt add.

In one run: (a) the same engine driven directly, unpaid, with the same
concurrency and requests (the baseline), then `--rounds` rounds of (b) the same
requests over HTTP to a bare route on the node's own loop that runs them on the
node's engine with no payment and no receipt, and (c) concurrent paid clients
over HTTP against the node on a real anvil, with the node's defaults (data
credit on: the adapter's held-out gain per Datanet, scored once per adapter in
the background, or reused from the machine's store; no per-request scoring);
each round gives (b) and (c) `--seconds / --rounds` seconds, so
both see the same drift of a shared machine. The clients of (b) and (c) run in
one separate process (real clients live on other machines), so their signing,
JSON and HTTP work does not compete with the node for its GIL. It prints
requests/s, p50/p99 latency, errors, and runs the audit afterwards.

What payment + receipt add is measured per request, not as a difference of
medians (each latency is mostly engine steps of 100+ ms, which would swamp a
few ms): the node's `Server-Timing` header says how long the engine (tokenize +
generate) took for that request, and `added = client latency - engine` is
everything else: HTTP, payment, signing and committing the receipt, and the
client's own voucher signing and receipt checks. The same difference for (b)
is HTTP alone, so payment + receipt add the paid p50 less the unpaid one
(target <= 5 ms at p50), over all rounds and per round. The tables go to
docs/benchmarks.md between `<!-- node:start -->` and `<!-- node:end -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"

from longtail.scripts.docs_section import write_section  # noqa: E402

PROMPTS = ["Draft a short clause.", "Name one duty of a tenant.", "What is an indemnity?", "Define venue."]


@dataclasses.dataclass(frozen=True)
class Timed:
    """One answer as the client process measured it; `server_timing` is the node's Server-Timing, in ms."""

    latency_seconds: float
    server_timing: dict[str, float]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def chat_body(prompt: str) -> dict:
    """The request every phase sends: one user message, 8 greedy tokens."""
    return {"model": "legal-r8", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0.0}


async def unpaid_baseline(generation, catalog_entry, requests, concurrency: int) -> list[float]:
    from longtail.node.requests import parse_completion

    latencies: list[float] = []
    queue = list(requests)

    async def worker():
        while queue:
            request = parse_completion(chat_body(queue.pop()), chat=True, max_tokens_limit=64)
            started = time.perf_counter()
            ids = generation.encode(request)
            await generation.generate(request, catalog_entry, ids)
            latencies.append(time.perf_counter() - started)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def timed_load(askers: list[Callable[[str], Awaitable]], seconds: float) -> tuple[list, int]:
    """One untimed request per client (it opens the HTTP connection and, when paid, the node's view of the
    channel: a chain read and two store reads), then every client asks in turn for `seconds`."""
    await asyncio.gather(*(ask(PROMPTS[i % len(PROMPTS)]) for i, ask in enumerate(askers)))
    answers: list = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(index: int, ask) -> None:
        nonlocal errors
        n = 0
        while time.monotonic() < deadline:
            try:
                answers.append(await ask(PROMPTS[(index + n) % len(PROMPTS)]))
            except Exception as error:  # counted, reported; the load goes on
                errors += 1
                print(f"error: {error}", file=sys.stderr)
            n += 1
    await asyncio.gather(*(worker(i, ask) for i, ask in enumerate(askers)))
    return answers, errors


KINDS = ("unpaid", "paid")


async def alternate_loads(clients, node_url: str, unpaid_url: str, rounds: int, seconds: float,
                          mark: Callable[[tuple], None]) -> tuple[dict[str, list[list[tuple]]], dict[str, int]]:
    """`rounds` times: the unpaid endpoint for `seconds`, then the paying clients for `seconds`. `mark` tells the
    node's process where each phase starts and ends (it takes the node's CPU use there). The paying clients
    settle what they owe at the end."""
    import aiohttp

    from longtail.node.timing import HEADER as TIMING_HEADER
    from longtail.node.timing import parse_server_timing

    async def ask_unpaid(session, prompt: str) -> Timed:
        started = time.perf_counter()
        async with session.post(unpaid_url, json=chat_body(prompt)) as response:
            payload = await response.json()
            if response.status != 200:
                raise RuntimeError(f"unpaid endpoint answered {response.status}: {payload}")
            timing = parse_server_timing(response.headers.get(TIMING_HEADER))
        return Timed(time.perf_counter() - started, timing)

    sessions = [aiohttp.ClientSession() for _ in clients]
    askers = {"unpaid": [functools.partial(ask_unpaid, session) for session in sessions],
              "paid": [functools.partial(client.ask, session, node_url, "legal-r8", max_tokens=8)
                       for client, session in zip(clients, sessions, strict=True)]}
    timed: dict[str, list[list[tuple]]] = {kind: [] for kind in KINDS}
    errors = dict.fromkeys(KINDS, 0)
    try:
        for _ in range(rounds):
            for kind in KINDS:
                mark(("start", kind))
                answers, failed = await timed_load(askers[kind], seconds)
                mark(("end", kind))
                timed[kind].append([(a.latency_seconds, a.server_timing) for a in answers])
                errors[kind] += failed
        for client, session in zip(clients, sessions, strict=True):
            await client.settle(session, node_url)
        return timed, errors
    finally:
        for session in sessions:
            await session.close()


def client_process(anvil_url: str, deployment_path: str, node_url: str, unpaid_url: str, keys: list[bytes],
                   state_root: str, rounds: int, seconds: float, sender) -> None:
    """Entry point of the client process: one paying client per key, the alternating rounds. Sends back plain
    data only (this module is `__mp_main__` here): phase marks, then ("done", timed, errors)."""
    from eth_account import Account

    from longtail.contracts.deployment import Deployment
    from longtail.node.client import PayingClient

    deployment = Deployment.load(Path(deployment_path))
    clients = [PayingClient(Account.from_key(key), anvil_url, deployment, Path(state_root) / f"client-{i}")
               for i, key in enumerate(keys)]
    timed, errors = asyncio.run(alternate_loads(clients, node_url, unpaid_url, rounds, seconds, sender.send))
    sender.send(("done", timed, errors))
    sender.close()


@dataclasses.dataclass
class Phases:
    """What the client process measured, per kind and round, and the node process's CPU use in those phases."""

    answers: dict[str, list[list[Timed]]]
    errors: dict[str, int]
    cpu_seconds: dict[str, float]
    switches: dict[str, int]

    def pooled(self, kind: str) -> list[Timed]:
        return [answer for round_answers in self.answers[kind] for answer in round_answers]


async def alternate_loads_elsewhere(anvil_url: str, deployment_path: Path, node_url: str, unpaid_url: str,
                                    keys: list[bytes], state_root: Path, rounds: int, seconds: float) -> Phases:
    """`client_process` in a spawned process, while this event loop keeps serving the node."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=client_process, name="bench-clients",
                              args=(anvil_url, str(deployment_path), node_url, unpaid_url, keys, str(state_root),
                                    rounds, seconds, sender))
    process.start()
    sender.close()  # else a child that dies before sending would leave recv waiting forever
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()
    cpu_seconds, switches = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0)
    started: dict[str, tuple[float, int]] = {}

    def on_message() -> None:
        # Read in the loop, not in a thread: the node's own to_thread work needs the default pool.
        try:
            message = receiver.recv()
        except EOFError:
            message = ("gone",)
        if message[0] == "start":
            started[message[1]] = node_usage()
        elif message[0] == "end":
            cpu, switched = node_usage()
            cpu_seconds[message[1]] += cpu - started[message[1]][0]
            switches[message[1]] += switched - started[message[1]][1]
        elif not finished.done():
            finished.set_result(message)

    loop.add_reader(receiver.fileno(), on_message)
    try:
        message = await finished
    finally:
        loop.remove_reader(receiver.fileno())
    receiver.close()
    await asyncio.to_thread(process.join)
    if message[0] != "done":
        raise RuntimeError(f"the client process exited with {process.exitcode} before sending its answers")
    _, timed, errors = message
    answers = {kind: [[Timed(latency, timing) for latency, timing in round_answers] for round_answers in rounds_]
               for kind, rounds_ in timed.items()}
    return Phases(answers, errors, cpu_seconds, switches)


def node_usage() -> tuple[float, int]:
    """CPU seconds (user + system) and voluntary context switches of this process: the node's loop and threads,
    not the engine's or the clients' processes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_nvcsw


def usage_per_request(phases: Phases, kind: str, clients: int) -> str:
    """The node process's CPU and voluntary switches per request of `kind`, its warm-up requests counted."""
    requests = len(phases.pooled(kind)) + clients * len(phases.answers[kind])
    return f"{1000 * phases.cpu_seconds[kind] / requests:.1f} ms ({phases.switches[kind] / requests:.0f} switches)"


def added_ms(answers: list[Timed]) -> list[float]:
    """Per request: client latency less the node's engine time, in ms."""
    return [1000 * answer.latency_seconds - answer.server_timing["engine"] for answer in answers]


async def start_unpaid_endpoint(generation, entry, max_tokens_limit: int):
    """A bare aiohttp route on the node's loop that runs a chat request on the node's engine with no payment and
    no receipt: the baseline that separates what payment + receipt add from what HTTP adds."""
    from aiohttp import web

    from longtail.node.requests import parse_completion
    from longtail.node.timing import HEADER as TIMING_HEADER
    from longtail.node.timing import StageTimes

    async def chat(request: web.Request) -> web.Response:
        started = time.perf_counter()
        times = StageTimes()
        parsed = parse_completion(await request.json(), chat=True, max_tokens_limit=max_tokens_limit)
        with times.stage("engine"):  # as the node times it: tokenize + generate
            prompt_ids = generation.encode(parsed)
            result = await generation.generate(parsed, entry, prompt_ids)
        body = {"object": "chat.completion", "model": parsed.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(result.token_ids)}}
        times.add("total", time.perf_counter() - started)
        return web.json_response(body, headers={TIMING_HEADER: times.header()})

    app = web.Application()
    app.router.add_post("/unpaid/chat", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/unpaid/chat"


def overhead_rows(answers: list[Timed]) -> list[tuple[str, list[float]]]:
    """Per request, in ms: what the paid path adds to the engine's own time, and its parts."""
    payment, receipt, node_rest, outside = [], [], [], []
    for answer in answers:
        timing = answer.server_timing
        latency = 1000 * answer.latency_seconds
        payment.append(timing["payment"])
        receipt.append(timing["receipt"])
        node_rest.append(timing["total"] - timing["engine"] - timing["payment"] - timing["receipt"])
        outside.append(latency - timing["total"])
    return [
        ("**added: client latency − engine**", added_ms(answers)),
        ("payment (reserve with voucher check, settle)", payment),
        ("receipt (attribute, sign, durable commit)", receipt),
        ("rest of the node (routing, catalog, JSON body)", node_rest),
        ("outside the node handler (HTTP, JSON, client signing and checks)", outside),
    ]


def data_credit_outcome(enabled: bool, stored_before: bool, credit) -> str:
    """What the once-per-adapter scoring did in this run: its engine work shares the batch of whichever phases it
    overlapped, so a run that scored it is not the steady state a run that reused it measures."""
    if not enabled:
        return "off"
    if stored_before:
        return "reused from the store of an earlier run (no scoring during this one)"
    if credit is None:
        return "not scored by the end (no local copy of its Datanets, failed, or still running: see the node's log)"
    gains = ", ".join(f"{datanet[:10]} {gain.gain_per_token:+.3f}" for datanet, gain in sorted(credit.gains.items()))
    return f"scored during this run, its engine work beside the phases' answers (held-out nats per token: {gains})"


async def main_async(args) -> int:
    from longtail.contracts.anvil import DEV_ACCOUNTS, Anvil
    from longtail.contracts.client import LongtailContracts
    from longtail.contracts.deployment import OPEN
    from longtail.node.auditor import audit
    from longtail.node.client import PayingClient
    from longtail.node.config import NodeConfig
    from longtail.node.devnet import ADAPTERS, setup_chain
    from longtail.node.runner import open_node

    os.environ.setdefault("LONGTAIL_KEY_PASSWORD", "bench")
    anvil = Anvil().start()
    tmp = Path(tempfile.mkdtemp(prefix="longtail-bench-"))
    try:
        deployment, _ = setup_chain(anvil.w3, log=lambda *_: None)
        deployment.save(tmp / "deployment.json")
        config = NodeConfig(name="bench", home=tmp / "node", http_port=0, chain_rpc=anvil.url,
                            deployment=tmp / "deployment.json", adapters=(str(ADAPTERS / "legal-r8"),),
                            checkpoint_every_receipts=10**9, checkpoint_every_seconds=10**6,
                            max_waiting_requests=256, adapter_credit=args.adapter_credit)
        running = await open_node(config, bytes(DEV_ACCOUNTS[1].key))
        entry = running.node.catalog.resolve("legal-r8")
        attributor = running.node.attributor
        # Read at once: the scoring the node just started stores its credit only after many engine steps.
        stored_before = (attributor.credit_store is not None and args.adapter_credit
                         and await asyncio.to_thread(attributor.credit_store.get, entry.adapter_id.lower()) is not None)
        requests = [PROMPTS[i % len(PROMPTS)] for i in range(args.baseline_requests)]
        await unpaid_baseline(running.node.generation, entry, requests[:2], 1)  # warm-up
        started = time.perf_counter()
        base = await unpaid_baseline(running.node.generation, entry, requests, args.clients)
        base_seconds = time.perf_counter() - started
        keys = []
        for i in range(args.clients):
            account = DEV_ACCOUNTS[4 + i % 6]
            LongtailContracts.connect(anvil.w3, deployment).token.mint(DEV_ACCOUNTS[0], account.address, 1000 * OPEN)
            client = PayingClient(account, anvil.url, deployment, tmp / f"client-{i}")
            await asyncio.to_thread(client.ensure_deposit, running.node.address, 10**18, 10**19)
            keys.append(bytes(account.key))
        unpaid_runner, unpaid_url = await start_unpaid_endpoint(running.node.generation, entry,
                                                                config.max_tokens_limit)
        phases = await alternate_loads_elsewhere(anvil.url, tmp / "deployment.json", running.url, unpaid_url, keys,
                                                 tmp, args.rounds, args.seconds / args.rounds)
        await unpaid_runner.cleanup()
        data_credit = data_credit_outcome(args.adapter_credit, stored_before,
                                          attributor.data_credits.get(entry.adapter_id.lower()))
        await running.checkpointer.run_round()
        report = await audit(running.url, anvil.url, deployment)
        await running.stop()
    finally:
        anvil.stop()
    answers, plain = phases.pooled("paid"), phases.pooled("unpaid")
    errors, plain_errors = phases.errors["paid"], phases.errors["unpaid"]
    paid = [a.latency_seconds for a in answers]
    added = statistics.median(paid) - statistics.median(base)
    plain_latency = [t.latency_seconds for t in plain]
    rows = [
        ("unpaid engine, direct", len(base), f"{len(base) / base_seconds:.2f}",
         f"{1000 * percentile(base, 0.5):.0f}", f"{1000 * percentile(base, 0.99):.0f}", 0),
        ("unpaid over HTTP (same node, engine and clients; no payment, no receipt)", len(plain),
         f"{len(plain) / args.seconds:.2f}", f"{1000 * percentile(plain_latency, 0.5):.0f}",
         f"{1000 * percentile(plain_latency, 0.99):.0f}", plain_errors),
        ("paid over HTTP", len(paid), f"{len(paid) / args.seconds:.2f}",
         f"{1000 * percentile(paid, 0.5):.0f}", f"{1000 * percentile(paid, 0.99):.0f}", errors),
    ]
    stages = overhead_rows(answers)
    http_only = added_ms(plain)
    paid_extra = percentile(stages[0][1], 0.5) - percentile(http_only, 0.5)
    per_round = [percentile(added_ms(paid_round), 0.5) - percentile(added_ms(plain_round), 0.5)
                 for plain_round, paid_round in zip(phases.answers["unpaid"], phases.answers["paid"], strict=True)]
    plain_usage = usage_per_request(phases, "unpaid", args.clients)
    paid_usage = usage_per_request(phases, "paid", args.clients)
    table = "\n".join([
        f"## Node under load ({args.clients} concurrent clients, 8 output tokens, embedded model, this CPU)",
        "",
        f"`python scripts/bench_node.py` ({args.seconds:.0f} s paid and {args.seconds:.0f} s unpaid over HTTP, "
        f"alternating in {args.rounds} rounds of {args.seconds / args.rounds:.0f} s each, every phase after one "
        "untimed request per client; node defaults, "
        + ("data credit on (the adapter's held-out gain, scored once in the background, never per request)"
           if args.adapter_credit else "but data credit off (`--no-adapter-credit`)")
        + "; the clients run in a separate process, node and engine share another, on the same two cores).",
        "", "| run | requests | req/s | p50 ms | p99 ms | errors |", "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {' | '.join(str(c) for c in row)} |" for row in rows], "",
        "Per paid request, from the node's `Server-Timing` (engine = tokenize + generate for that request):",
        "", "| ms per request | p50 | p99 |", "| --- | ---: | ---: |",
        *[f"| {name} | {percentile(values, 0.5):.2f} | {percentile(values, 0.99):.2f} |" for name, values in stages],
        f"| unpaid over HTTP: client latency − engine (HTTP alone) | {percentile(http_only, 0.5):.2f} | "
        f"{percentile(http_only, 0.99):.2f} |",
        "",
        f"**Payment + receipt add {paid_extra:.2f} ms at p50** per request (target ≤ 5 ms): the paid requests' "
        f"added time ({percentile(stages[0][1], 0.5):.2f} ms) less that of the same requests over HTTP without "
        f"payment or receipt ({percentile(http_only, 0.5):.2f} ms), both measured per request as client latency "
        f"minus the node's engine time, under the same load; round by round: "
        f"{', '.join(f'{value:.2f}' for value in per_round)} ms. Counting HTTP too, against the engine called "
        f"directly: {percentile(stages[0][1], 0.5):.2f} ms (p99 {percentile(stages[0][1], 0.99):.2f} ms). "
        "Difference of the medians, paid − "
        f"unpaid: {1000 * added:.1f} ms (ratio {statistics.median(paid) / statistics.median(base):.3f}), which also "
        "holds queueing noise of whole engine steps (and, in a run that scores the data credit, that scoring's "
        "engine work). Adapter's data credit: "
        f"{data_credit}. Audit after the run: "
        f"{'clean' if report.clean else f'{len(report.findings)} findings'} ({report.receipts_checked} receipts).",
        "",
        f"CPU and voluntary context switches of the node's process per request (getrusage over the phases, "
        f"warm-up included; the engine and the clients are other processes): {plain_usage} unpaid, {paid_usage} "
        "paid. On two cores that an engine keeps busy, each ms of it and each wake-up waits for a core.",
    ])
    print(table)
    write_section(DOC, "node", table)
    return 0 if report.clean and errors == 0 and plain_errors == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="paid seconds in all (and as many unpaid)")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of an unpaid and a paid phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--adapter-credit", action=argparse.BooleanOptionalAction, default=True,
                        help="score the adapter's held-out data credit once, in the background, unless stored "
                        "from an earlier run (the node's default: on); never per request")
    parser.add_argument("--baseline-requests", type=int, default=24)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
