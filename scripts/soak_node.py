"""Soak a real node with paid, streamed and hostile requests while it is killed with SIGKILL and restarted.

    .venv/bin/python -P scripts/soak_node.py --seconds 120 --kill-every 30

The node runs in a child process (embedded base model on a thread engine, SQLite receipt log, the HTTP edge
with its production server options); the chain's answers are local functions, as in tests/node/test_faults.py.
Clients send a mix of ordinary paid chats, paid streams, valid-but-extreme sampling, and the hostile cases
of issue 21 (nesting bomb, lone surrogates, NaN and huge numbers, string flags, oversized and unpaid
megabyte bodies, a slowloris connection). Every few seconds the child is killed with SIGKILL and started
again on the same database.

What it counts: requests by outcome; errors (a 5xx, or a status the case does not expect); hangs (no
answer within 60 s); interrupted (the connection died with the node, nothing was answered); and receipts
lost: answers a client received whose receipt is not in the log after the last restart (target 0).
The table goes into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
CLIENT = "0x" + "cc" * 20
CHANNEL = "0x" + "01" * 32
KEY = bytes(range(1, 33))
PAY = {"X-Longtail-Channel": CHANNEL, "X-Longtail-Voucher-Amount": str(10**18),
       "X-Longtail-Voucher-Signature": "0x" + "11" * 65}
HANG_SECONDS = 60.0
ENGINE_KILLS = [False]  # set when the soak kills the engine child: 503 engine_unavailable becomes expected

from longtail.scripts.docs_section import write_section  # noqa: E402

# --- the node (child process) --------------------------------------------------------------------------

def serve(home: Path, port: int, engine_process: bool) -> None:
    """Run one node until killed; prints READY when it listens."""
    from aiohttp import web
    from eth_account import Account
    from transformers import AutoTokenizer

    from longtail.attribution.receipts import ReceiptDomain
    from longtail.attribution.store import ReceiptLog
    from longtail.node.api import SERVER_OPTIONS, build_app
    from longtail.node.attributor import Attributor
    from longtail.node.catalog import Catalog, CatalogEntry
    from longtail.node.config import NodeConfig
    from longtail.node.generation import GenerationGateway
    from longtail.node.payments import ChannelState, PaymentIntake
    from longtail.node.runner import build_engine
    from longtail.node.service import Node
    from longtail.serving.base_models import embedded_model_dir

    async def main() -> None:
        model_dir = embedded_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if engine_process:
            from longtail.serving.engine_process import EngineProcess

            # The soak kills the engine on purpose, more often than a real crash loop would.
            engine = await asyncio.to_thread(EngineProcess, model_dir, kv_cache_bytes=64 * 2**20, max_restarts=1000)
        else:
            engine = build_engine(NodeConfig(kv_cache_bytes=64 * 2**20, engine_process=False), model_dir)
        address = Account.from_key(KEY).address
        receipt_log = ReceiptLog.open(f"sqlite:///{home / 'receipts.sqlite'}", KEY,
                                      ReceiptDomain(chain_id=31337, verifying_contract="0x" + "22" * 20))
        store = receipt_log.store

        async def read_channel(channel_id):
            return ChannelState(channel_id, CLIENT, address, 10**24, 0, False)

        async def load_account(channel_id):
            return await asyncio.to_thread(store.channel_total, address, channel_id), None

        async def save_voucher(voucher, client):
            await asyncio.to_thread(store.record_voucher, voucher.channel_id, client, voucher.cumulative_amount,
                                    voucher.signature)

        payments = PaymentIntake(address, read_channel, lambda voucher: CLIENT, load_account, save_voucher,
                                 channel_cache_seconds=0.0,
                                 require_authorization=False)  # fake signatures: payment is not the subject
        config = NodeConfig(name="soak", home=home, max_prompt_tokens=512, max_tokens_limit=16,
                            adapter_credit=False, price_per_1k_tokens=1000)
        node = Node(config, address, Catalog(CatalogEntry(name="base", adapter_id=None, price_per_1k_tokens=1000)),
                    GenerationGateway(engine, tokenizer), receipt_log, payments, Attributor(), "0x" + "33" * 32)
        runner = web.AppRunner(build_app(node), access_log=None, **SERVER_OPTIONS)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the clients -----------------------------------------------------------------------------------------

def chat(content: str = "Say something short.", **extra) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def raw(text: str) -> bytes:
    return text.encode()


# (name, method, path, body: dict | bytes | None, headers, expected statuses). Bodies are built once.
CASES = [
    ("paid chat", "POST", "/v1/chat/completions", chat(), PAY, {200}),
    ("paid completion", "POST", "/v1/completions", {"model": "base", "prompt": "Once upon", "max_tokens": 6}, PAY,
     {200}),
    ("paid stream", "POST", "/v1/chat/completions", chat(stream=True), PAY, {200}),
    ("temperature 1e-40", "POST", "/v1/chat/completions", chat(temperature=1e-40), PAY, {200}),
    ("top_p 0, int64 seed", "POST", "/v1/chat/completions", chat(top_p=0, seed=2**63 - 1), PAY, {200}),
    ("nesting bomb", "POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, {}, {400}),
    ("lone surrogate", "POST", "/v1/completions", raw('{"model": "base", "prompt": "a\\ud800b"}'), PAY, {400}),
    ("max_tokens NaN", "POST", "/v1/chat/completions", raw(json.dumps(chat())[:-1] + ', "max_tokens": NaN}'), PAY,
     {400}),
    ("max_tokens 1e400", "POST", "/v1/chat/completions", raw(json.dumps(chat())[:-1] + ', "max_tokens": 1e400}'), PAY,
     {400}),
    ("5000-digit int", "POST", "/v1/chat/completions", raw(json.dumps(chat())[:-1] + ', "seed": ' + "9" * 5000 + "}"),
     PAY, {400}),
    ("seed 2^64", "POST", "/v1/chat/completions", chat(seed=2**64), PAY, {400}),
    ('stream "false"', "POST", "/v1/chat/completions", chat(stream="false"), PAY, {400}),
    ("n 2", "POST", "/v1/chat/completions", chat(n=2), PAY, {400}),
    ("from_seq 2^64", "GET", "/v1/receipts?from_seq=18446744073709551616", None, {}, {400}),
    ("unpaid megabyte prompt", "POST", "/v1/completions",
     {"model": "base", "prompt": "hello world, " * 75_000}, {}, {400, 402}),
    ("paid megabyte prompt", "POST", "/v1/completions",
     {"model": "base", "prompt": "hello world, " * 75_000}, PAY, {400}),  # tokenised, then over max_prompt_tokens
    ("oversized body", "POST", "/v1/completions", b'{"prompt": "' + b"a" * (1 << 20) + b'"}', {}, {413}),
]
WEIGHTS = [6, 2, 3, 1, 1] + [1] * (len(CASES) - 5)


class Tally:
    def __init__(self) -> None:
        self.outcomes: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.hangs = 0
        self.interrupted = 0
        self.refused = 0
        self.answered_since_engine_kill = False  # the engine is back: killing it again tests a restart, not a load
        self.answered: set[str] = set()


async def one_request(session, url: str, case, tally: Tally) -> None:
    import aiohttp

    name, method, path, body, headers, expected = case
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
    try:
        async with asyncio.timeout(HANG_SECONDS):
            async with session.request(method, url + path, headers=headers, **kwargs) as response:
                text = await response.text()
                status = response.status
    except TimeoutError:
        tally.hangs += 1
        tally.errors.append(f"{name}: no answer in {HANG_SECONDS:g} s")
        return
    except aiohttp.ClientConnectorError:
        tally.refused += 1  # the node is restarting
        await asyncio.sleep(0.2)
        return
    except (aiohttp.ClientError, ConnectionError):
        tally.interrupted += 1  # the node died under this request: nothing answered, nothing owed by the client
        return
    tally.outcomes[(name, status)] += 1
    if status == 503 and ENGINE_KILLS[0] and '"engine_unavailable"' in text:
        return  # the engine child was killed under it: a clear 503 is the promise
    if status not in expected:
        tally.errors.append(f"{name}: HTTP {status}: {text[:160]}")
        return
    if status == 200 and path.endswith("completions"):
        if body.get("stream") is True:
            events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
            if events[-1] != "[DONE]":
                tally.errors.append(f"{name}: stream did not end with [DONE]")
                return
            final = [json.loads(e) for e in events[:-1] if '"longtail"' in e]
            if not final and ENGINE_KILLS[0] and '"engine_unavailable"' in events[-2]:
                tally.outcomes[(name, status)] -= 1
                tally.outcomes[(name + ": engine killed mid-stream, error event", status)] += 1
                return
            if not final:
                tally.errors.append(f"{name}: stream ended without its receipt: {events[-2][:160]}")
                return
            tally.answered.add(final[-1]["id"])
        else:
            tally.answered.add(json.loads(text)["id"])
        tally.answered_since_engine_kill = True


async def slowloris(address: tuple[str, int], tally: Tally) -> None:
    """One connection that never finishes its headers: the node must close it (keepalive_timeout)."""
    try:
        reader, writer = await asyncio.open_connection(*address)
    except OSError:
        tally.refused += 1
        await asyncio.sleep(0.5)
        return
    started = time.perf_counter()
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\n")
        while time.perf_counter() - started < HANG_SECONDS:
            await asyncio.sleep(1.0)
            writer.write(b"X-Drip: 1\r\n")
            await writer.drain()
            if reader.at_eof():
                break
        else:
            tally.hangs += 1
            tally.errors.append("slowloris: the node kept the connection open")
            return
        tally.outcomes[("slowloris closed", 0)] += 1
    except (ConnectionError, OSError):
        tally.outcomes[("slowloris closed", 0)] += 1
    finally:
        writer.close()


def start_node(home: Path, port: int, engine_process: bool) -> subprocess.Popen:
    command = [sys.executable, "-P", __file__, "--serve", "--home", str(home), "--port", str(port)]
    child = subprocess.Popen(command + (["--engine-process"] if engine_process else []), stdout=subprocess.PIPE,
                             text=True)
    line = child.stdout.readline()
    if line.strip() != "READY":
        child.kill()
        raise RuntimeError(f"node did not start: {line!r}")
    return child


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the node's engine child), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def soak(seconds: float, kill_every: float, concurrency: int, home: Path, kill_engine_every: float) -> dict:
    import aiohttp

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tally = Tally()
    rng = random.Random(21)
    engine_process = kill_engine_every > 0
    ENGINE_KILLS[0] = engine_process
    child = await asyncio.to_thread(start_node, home, port, engine_process)
    kills = engine_kills = 0
    next_engine_kill = time.perf_counter() + kill_engine_every
    deadline = time.perf_counter() + seconds
    next_kill = time.perf_counter() + kill_every

    async def worker() -> None:
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() < deadline:
                await one_request(session, url, rng.choices(CASES, WEIGHTS)[0], tally)

    async def loris() -> None:
        while time.perf_counter() < deadline:
            await slowloris(("127.0.0.1", port), tally)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)] + [asyncio.create_task(loris())]
    try:
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.5)
            if kill_every and time.perf_counter() >= next_kill and time.perf_counter() < deadline - 5:
                child.send_signal(signal.SIGKILL)
                await asyncio.to_thread(child.wait)
                kills += 1
                child = await asyncio.to_thread(start_node, home, port, engine_process)
                next_kill = time.perf_counter() + kill_every
            if engine_process and time.perf_counter() >= next_engine_kill and time.perf_counter() < deadline - 5 \
                    and tally.answered_since_engine_kill:
                tally.answered_since_engine_kill = False
                for engine_pid in children_of(child.pid):
                    os.kill(engine_pid, signal.SIGKILL)
                    engine_kills += 1
                next_engine_kill = time.perf_counter() + kill_engine_every
        await asyncio.gather(*tasks)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    from longtail.attribution.store import ReceiptStore

    store = ReceiptStore.open(f"sqlite:///{home / 'receipts.sqlite'}")
    lost = sorted(rid for rid in tally.answered if not store.bodies_for_request(rid))
    store.close()
    requests = sum(tally.outcomes.values()) + tally.interrupted + tally.hangs  # refused ones never reached it
    return {"seconds": seconds, "kills": kills, "engine_kills": engine_kills, "requests": requests, "answered_with_receipt": len(tally.answered),
            "errors": len(tally.errors), "hangs": tally.hangs, "interrupted": tally.interrupted,
            "refused_while_restarting": tally.refused,
            "receipts_lost": len(lost), "outcomes": tally.outcomes,
            "error_samples": tally.errors[:10]}


def table(result: dict) -> str:
    engine = (f", its engine child killed with SIGKILL {result['engine_kills']} times" if result["engine_kills"]
              else "")
    lines = [f"Soak of {result['seconds']:g} s, node killed with SIGKILL {result['kills']} times{engine} "
             f"(`scripts/soak_node.py`, {time.strftime('%Y-%m-%d')}):", "",
             "| figure | value |", "|---|---|"]
    for key in ("requests", "answered_with_receipt", "errors", "hangs", "interrupted", "refused_while_restarting",
                "receipts_lost"):
        lines.append(f"| {key.replace('_', ' ')} | {result[key]} |")
    lines += ["", "| case | status | count |", "|---|---|---|"]
    for (name, status), count in sorted(result["outcomes"].items()):
        lines.append(f"| {name} | {status or 'closed by the node'} | {count} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--kill-every", type=float, default=30.0, help="SIGKILL the node this often (0: never)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kill-engine-every", type=float, default=0.0,
                        help="run the engine in its own process and SIGKILL it this often, once it answers again "
                             "(0: a thread engine)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/reliability.md alone")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engine-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.home, args.port, args.engine_process)
        return
    with tempfile.TemporaryDirectory(prefix="longtail-soak-") as home:
        result = asyncio.run(soak(args.seconds, args.kill_every, args.concurrency, Path(home),
                                  args.kill_engine_every))
    text = table(result)
    print(text)
    for sample in result["error_samples"]:
        print("error:", sample)
    if not args.no_doc:
        write_section(DOC, "soak-engine" if args.kill_engine_every else "soak", text)
    if result["errors"] or result["receipts_lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
