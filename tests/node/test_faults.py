"""A real node under faults: a poisoned batch, streams that fail, big inputs, peers that lie, drip or vanish, a
chain that is down, hostile adapter files and a full disk.

The node is the real one (embedded base model on a thread engine, SQLite receipt log, payment intake, HTTP
server on loopback); only the chain's answers are local functions, as in test_payments.py (the chain itself
under faults is in test_network.py). The official `openai` client checks the API's shape.
"""

from __future__ import annotations

import asyncio
import errno
import http.server
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from longtail.node.payments import ChannelState, PaymentIntake
from longtail.serving.base_models import embedded_model_dir

from http_edge import serving

pytestmark = pytest.mark.slow
CLIENT = "0x" + "cc" * 20
CHANNEL = "0x" + "01" * 32
KEY = bytes(range(1, 33))
PAY = {"X-Longtail-Channel": CHANNEL, "X-Longtail-Voucher-Amount": str(10**18),
       "X-Longtail-Voucher-Signature": "0x" + "11" * 65}


@pytest.fixture(scope="module")
def model():
    if not (embedded_model_dir() / "config.json").exists():
        pytest.skip("embedded base model not prepared: run `make setup`")
    from transformers import AutoTokenizer

    from longtail.node.config import NodeConfig
    from longtail.node.runner import build_engine

    # On a thread of this process: the sampler faults below are injected into this process's sampling module.
    engine = build_engine(NodeConfig(kv_cache_bytes=48 * 2**20, engine_process=False), embedded_model_dir())
    yield engine, AutoTokenizer.from_pretrained(embedded_model_dir())
    getattr(engine, "shutdown", lambda: None)()


def make_node(tmp: Path, model, chain_up: dict | None = None):
    from eth_account import Account

    from longtail.attribution.receipts import ReceiptDomain
    from longtail.attribution.store import ReceiptLog
    from longtail.node.attributor import Attributor
    from longtail.node.catalog import Catalog, CatalogEntry
    from longtail.node.config import NodeConfig
    from longtail.node.generation import GenerationGateway
    from longtail.node.service import Node

    engine, tokenizer = model
    address = Account.from_key(KEY).address
    chain = chain_up if chain_up is not None else {"up": True}

    async def read_channel(channel_id):
        if not chain["up"]:
            raise ConnectionError("chain down")
        return ChannelState(channel_id, CLIENT, address, 10**18, 0, False)

    async def load_account(channel_id):
        return 0, None

    async def save_voucher(voucher, client):
        pass

    config = NodeConfig(name="faults", home=tmp, max_prompt_tokens=512, max_tokens_limit=16, adapter_credit=False,
                        price_per_1k_tokens=1000)
    receipt_log = ReceiptLog.open(f"sqlite:///{tmp / 'receipts.sqlite'}", KEY,
                                  ReceiptDomain(chain_id=31337, verifying_contract="0x" + "22" * 20))
    payments = PaymentIntake(address, read_channel, lambda voucher: CLIENT, load_account, save_voucher,
                             channel_cache_seconds=0.0,
                             require_authorization=False)  # fake signatures: payment is not the subject
    catalog = Catalog(CatalogEntry(name="base", adapter_id=None, price_per_1k_tokens=1000))
    return Node(config, address, catalog, GenerationGateway(engine, tokenizer), receipt_log, payments, Attributor(),
                "0x" + "33" * 32)


def run(coro, timeout=240):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def chat(content="Say hello.", **extra):
    return {"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


# --- one request must not poison the batch --------------------------------------------------------

def test_extreme_but_valid_sampling_beside_ordinary_requests_all_answer(tmp_path, model):
    """temperature 1e-40 once made the sampler throw and Engine._loop fail every running request with it."""
    async def scenario():
        node = make_node(tmp_path, model)
        async with serving(node) as (session, _):
            async def post(body):
                async with session.post("/v1/chat/completions", json=body, headers=PAY) as response:
                    return response.status, await response.json()

            results = await asyncio.gather(post(chat(temperature=1e-40)), post(chat(temperature=0.7, seed=1)),
                                           post(chat(temperature=0.7, seed=2)), post(chat(top_p=0, seed=3)),
                                           post(chat(seed=2**63 - 1, top_k=1)))
            assert [status for status, _ in results] == [200] * 5, results
            assert node.receipt_log.size == 5

    run(scenario())


def test_a_row_whose_sampler_fails_ends_only_its_own_request(tmp_path, model, monkeypatch):
    """The second line behind the edge's checks: a sampler failure on one row is that request's 500 alone."""
    from longtail.serving import engine as engine_module
    from longtail.serving.errors import SamplingFailed

    original = engine_module.sample_rows  # the batch sampler: one call per step, one result per row

    def failing_for_half(logits, params, generators):
        picks = original(logits, params, generators)
        return [SamplingFailed("injected: this row's distribution degenerated") if p.temperature == 0.5 else pick
                for p, pick in zip(params, picks, strict=True)]

    monkeypatch.setattr(engine_module, "sample_rows", failing_for_half)

    async def scenario():
        node = make_node(tmp_path, model)
        async with serving(node) as (session, _):
            async def post(body):
                async with session.post("/v1/chat/completions", json=body, headers=PAY) as response:
                    return response.status, await response.json()

            bad, good_a, good_b = await asyncio.gather(post(chat(temperature=0.5)), post(chat(temperature=0.7)),
                                                       post(chat(temperature=0)))
        assert bad[0] == 500 and bad[1]["error"]["code"] == "sampling_failed", bad
        assert good_a[0] == 200 and good_b[0] == 200, (good_a, good_b)
        assert node.receipt_log.size == 2

    run(scenario())


def test_a_stream_whose_engine_fails_mid_answer_ends_with_an_error_event(tmp_path, model, monkeypatch):
    from longtail.serving import engine as engine_module
    from longtail.serving.errors import SamplingFailed

    original = engine_module.sample_rows
    drawn = {"count": 0}

    def fail_on_third_token(logits, params, generators):
        picks = original(logits, params, generators)
        for index, row_params in enumerate(params):
            if row_params.temperature == 0.5:
                drawn["count"] += 1
                if drawn["count"] == 3:
                    picks[index] = SamplingFailed("injected after two tokens")
        return picks

    monkeypatch.setattr(engine_module, "sample_rows", fail_on_third_token)

    async def scenario():
        node = make_node(tmp_path, model)
        async with serving(node) as (session, _):
            body = chat(temperature=0.5, max_tokens=8, stream=True)
            async with session.post("/v1/chat/completions", json=body, headers=PAY) as response:
                assert response.status == 200
                text = await asyncio.wait_for(response.text(), 30)
            events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "sampling_failed"
            assert node.receipt_log.size == 0  # nothing signed for an answer that failed
            assert node._in_flight == 0
            async with session.post("/v1/chat/completions", json=chat(), headers=PAY) as response:
                assert response.status == 200  # the reservation was released: the channel still serves

    run(scenario())


def test_a_stream_refused_by_the_engine_before_its_first_token_keeps_its_status(tmp_path, model, monkeypatch):
    """An engine that is restarting answers a stream with 503, not a 200 whose body is an error event."""
    from longtail.serving.errors import EngineUnavailable

    class Restarting:
        """The engine as EngineProcess is while its child restarts: every new request is refused."""

        def stream(self, *args, **kwargs):
            raise EngineUnavailable("the engine process is restarting; retry shortly")

    async def scenario():
        node = make_node(tmp_path, model)
        async with serving(node) as (session, _):
            monkeypatch.setattr(node.generation, "engine", Restarting())
            async with session.post("/v1/chat/completions", json=chat(stream=True), headers=PAY) as response:
                body = await response.json()
                assert response.status == 503 and body["error"]["code"] == "engine_unavailable", body
            monkeypatch.undo()
            assert node._in_flight == 0
            async with session.post("/v1/chat/completions", json=chat(stream=True), headers=PAY) as response:
                assert response.status == 200 and "[DONE]" in await response.text()

    run(scenario())


# --- the official client ---------------------------------------------------------------------------

def test_openai_client_models_content_parts_usage_chunk_and_refusals(tmp_path, model):
    import openai

    async def scenario():
        node = make_node(tmp_path, model)
        async with serving(node) as (_, url):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", default_headers=PAY, max_retries=0)
            models = await client.models.list()
            assert [m.id for m in models.data] == ["base"] and models.data[0].created == node.started_at
            parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]
            answer = await client.chat.completions.create(model="base", max_tokens=4,
                                                          messages=[{"role": "user", "content": parts}])
            assert answer.choices[0].message.content is not None
            chunks = [c async for c in await client.chat.completions.create(
                model="base", max_tokens=4, messages=[{"role": "user", "content": "Hi"}], stream=True,
                stream_options={"include_usage": True})]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
            scored = await client.chat.completions.create(model="base", max_tokens=6, logprobs=True,
                                                          messages=[{"role": "user", "content": "Hi"}])
            content = scored.choices[0].logprobs.content
            assert len(content) == scored.usage.completion_tokens >= 1
            assert all(t.logprob <= 0 and t.top_logprobs == [] for t in content)
            assert "".join(t.token for t in content).strip() == scored.choices[0].message.content.strip()
            streamed = [c async for c in await client.chat.completions.create(
                model="base", max_tokens=6, logprobs=True, messages=[{"role": "user", "content": "Hi"}], stream=True)]
            tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
            assert tokens and "".join(t.token for t in tokens) == "".join(
                c.choices[0].delta.content or "" for c in streamed if c.choices)
            for refused in ({"n": 2}, {"logprobs": True, "top_logprobs": 2}, {"response_format": {"type": "json_object"}}):
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.chat.completions.create(model="base", max_tokens=4,
                                                         messages=[{"role": "user", "content": "Hi"}], **refused)
                assert caught.value.body["code"] == "unsupported_parameter"
            await client.close()

    run(scenario())


def test_the_stopping_end_token_is_not_charged(tmp_path, model):
    from longtail.node.generation import GenerationResult

    node = make_node(tmp_path, model)
    eos = model[1].eos_token_id
    assert node.answer_ids(GenerationResult([eos], "", finish_reason="stop")) == []
    assert node.answer_ids(GenerationResult([5, eos], "x", finish_reason="stop")) == [5]
    assert node.answer_ids(GenerationResult([5, 6], "xy", finish_reason="length")) == [5, 6]
    node.receipt_log.close()


# --- big inputs do not stall the event loop ---------------------------------------------------------

def test_healthz_stays_quick_while_megabyte_prompts_are_tokenised(tmp_path, model):
    import urllib.request

    async def scenario():
        node = make_node(tmp_path, model)
        async with serving(node) as (session, base_url):
            prompt = "hello world, " * 75_000  # ~1 MB: about a second of tokenising each
            # A loop blocked by tokenising holds /healthz for a whole tokenisation; the bound is a fraction of one,
            # timed here, so a loaded machine (slower tokenising, slower replies) moves both alike.
            began = time.perf_counter()
            await asyncio.to_thread(model[1], prompt)
            one_tokenisation = time.perf_counter() - began
            bound = max(0.5, 0.6 * one_tokenisation)

            async def oversized():  # paid, so it is tokenised (an unpaid one is refused before any work)
                async with session.post("/v1/completions", json={"model": "base", "prompt": prompt},
                                        headers=PAY) as response:
                    return response.status

            # The probe runs on its own thread: a client on the node's own loop would only start timing once the
            # loop was free again, and could not see it blocked.
            done, times = threading.Event(), []

            def probe():
                while not done.is_set():
                    started = time.perf_counter()
                    with urllib.request.urlopen(f"{base_url}/healthz", timeout=30) as response:
                        assert response.status == 200
                    times.append(time.perf_counter() - started)
                    time.sleep(0.05)

            prober = asyncio.create_task(asyncio.to_thread(probe))
            statuses = await asyncio.gather(*(oversized() for _ in range(3)))
            done.set()
            await prober
            assert statuses == [400] * 3  # over max_prompt_tokens, refused after counting
            assert len(times) >= 3
            assert max(times) < bound, (f"/healthz took {max(times):.2f} s while prompts were tokenised "
                                        f"(one tokenisation: {one_tokenisation:.2f} s)")

    run(scenario())


# --- adapters this node lacks: chain down, fetches side by side -------------------------------------

def test_unknown_adapter_with_the_chain_down_is_503_and_fetches_do_not_queue(tmp_path, model):
    from longtail.node.chain import ChainError
    from longtail.node.errors import UnknownModel

    slow_id, missing_id, down_id = ("0x" + c * 64 for c in "abc")
    release = asyncio.Event

    async def scenario():
        node = make_node(tmp_path, model)
        gate = release()

        async def fetcher(adapter_id):
            if adapter_id == slow_id:
                await gate.wait()  # a peer that takes its time
                raise UnknownModel(f"adapter {adapter_id} is not registered", param="model")
            if adapter_id == down_id:
                raise ChainError("eth_call: ConnectionError: chain down")
            raise UnknownModel(f"adapter {adapter_id} is not registered", param="model")

        node.adapter_fetcher = fetcher
        async with serving(node) as (session, _):
            async def post(model_id):
                async with session.post("/v1/chat/completions", json={**chat(), "model": model_id},
                                        headers=PAY) as response:
                    return response.status, await response.json()

            slow = asyncio.create_task(post(slow_id))
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            status, body = await post(missing_id)  # another adapter: not behind the slow fetch
            assert status == 404 and time.perf_counter() - started < 2.0
            status, body = await post(down_id)
            assert status == 503 and body["error"]["code"] == "adapter_unavailable", body
            assert "chain down" not in body["error"]["message"]  # the cause's class, not its internals
            gate.set()
            assert (await slow)[0] == 404

    run(scenario())


# --- peers that lie, drip or vanish ------------------------------------------------------------------

class MisbehavingPeer:
    """A TCP server that answers every connection with one scripted misbehaviour."""

    def __init__(self, behaviour) -> None:
        self.behaviour = behaviour
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection) -> None:
        with connection:
            connection.recv(65536)
            try:
                self.behaviour(connection)
            except OSError:
                pass

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/adapters/{{adapter_id}}/bundle"

    def close(self) -> None:
        self.server.close()


def _garbage(connection):
    connection.sendall(b"HTTP/1.1 2OO SURE\r\n\r\nnot a bundle")


def _cut_chunked(connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n" + b"x" * 20)


def _short_body(connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)


def _drip(connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(100):
        connection.sendall(b"x")
        time.sleep(0.2)


def _drip_headers(connection):
    for byte in b"HTTP/1.1 200 OK\r\n":
        connection.sendall(bytes([byte]))
        time.sleep(0.2)


def _lie(connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"LTAB" + b"\x00" * 16)


@pytest.mark.parametrize("behaviour, reason", [
    (_garbage, "failed"), (_cut_chunked, "failed"), (_short_body, "ended after"), (_drip, "within"),
    (_drip_headers, "within"), (_lie, "no source delivered"),
])
def test_peer_faults_end_as_fetch_failed_within_the_whole_transfer_deadline(tmp_path, behaviour, reason):
    from longtail.serving.adapter_store import AdapterStore, FetchFailed, HttpSource
    from longtail.serving.peft_format import ModuleShapes

    peer = MisbehavingPeer(behaviour)
    store = AdapterStore(tmp_path / "store")
    shapes = ModuleShapes.from_model_dir(embedded_model_dir())
    started = time.perf_counter()
    try:
        with pytest.raises(FetchFailed, match=reason):
            store.fetch("0x" + "ab" * 32, [HttpSource(peer.url(), timeout_s=1.0)], shapes)
    finally:
        peer.close()
    assert time.perf_counter() - started < 2.5
    assert store.list() == []


def test_a_vanished_peer_is_fetch_failed(tmp_path):
    from longtail.serving.adapter_store import FetchFailed, HttpSource

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(FetchFailed, match="failed"):
        HttpSource(f"http://127.0.0.1:{port}", timeout_s=1.0).fetch("0x" + "ab" * 32)


def test_a_real_bundle_still_arrives_through_the_deadline_code(tmp_path, tiny_llama):
    from longtail.serving.adapter_store import AdapterStore, HttpSource
    from longtail.serving.peft_format import ModuleShapes

    shapes = ModuleShapes.from_model_dir(tiny_llama.base_dir)
    origin = AdapterStore(tmp_path / "origin")
    record = origin.add(next(iter(tiny_llama.adapter_dirs.values())), shapes)
    bundle = origin.open_bundle(record.adapter_id)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(bundle)))
            self.end_headers()
            self.wfile.write(bundle)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/adapters/{{adapter_id}}/bundle"
        fetched = AdapterStore(tmp_path / "copy").fetch(record.adapter_id, [HttpSource(url, timeout_s=5)], shapes)
    finally:
        server.shutdown()
    assert fetched.adapter_id == record.adapter_id


# --- hostile adapter files and a full disk ------------------------------------------------------------

def _copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.mark.parametrize("swap", ["proc", "dev_zero", "fifo", "loop"])
def test_adapter_files_that_are_not_plain_files_are_rejected_quickly(tmp_path, tiny_llama, swap):
    from longtail.serving.adapter_store import AdapterStore
    from longtail.serving.peft_format import AdapterRejected, ModuleShapes

    folder = _copy_adapter(next(iter(tiny_llama.adapter_dirs.values())), tmp_path / "evil")
    config = folder / "adapter_config.json"
    config.unlink()
    if swap == "proc":
        config.symlink_to("/proc/self/pagemap")
    elif swap == "dev_zero":
        config.symlink_to("/dev/zero")
    elif swap == "fifo":
        os.mkfifo(config)
    else:
        config.symlink_to(config)
    started = time.perf_counter()
    with pytest.raises(AdapterRejected):
        AdapterStore(tmp_path / "store").add(folder, ModuleShapes.from_model_dir(tiny_llama.base_dir))
    assert time.perf_counter() - started < 1.0


def test_adapter_add_cli_prints_one_line_not_a_traceback(tmp_path, tiny_llama, monkeypatch):
    from typer.testing import CliRunner

    from longtail.node.cli import app

    monkeypatch.setenv("LONGTAIL_HOME", str(tmp_path / "home"))
    folder = _copy_adapter(next(iter(tiny_llama.adapter_dirs.values())), tmp_path / "evil")
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").symlink_to("/proc/self/pagemap")
    result = CliRunner().invoke(app, ["adapter", "add", str(folder), "--base", str(tiny_llama.base_dir)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception,
                                                                                          SystemExit)
    assert "adapter rejected" in result.output and "pseudo-file" in result.output


def test_a_full_disk_refuses_the_new_adapter_and_keeps_the_store(tmp_path, tiny_llama, monkeypatch):
    from longtail.serving import adapter_store
    from longtail.serving.adapter_store import AdapterStore, AdapterStoreError
    from longtail.serving.peft_format import ModuleShapes

    shapes = ModuleShapes.from_model_dir(tiny_llama.base_dir)
    first, second = list(tiny_llama.adapter_dirs.values())[:2]
    store = AdapterStore(tmp_path / "store")
    kept = store.add(first, shapes, name="kept")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adapter_store.shutil, "copyfile", disk_full)
    with pytest.raises(AdapterStoreError, match="No space left"):
        store.add(second, shapes, name="new")
    monkeypatch.undo()
    assert [r.adapter_id for r in store.list()] == [kept.adapter_id]
    assert store.verify("kept").ok
    assert not any(p.name.startswith(".staging-") for p in (tmp_path / "store").iterdir())


def test_a_full_receipt_disk_answers_503_and_keeps_the_log(tmp_path, model, monkeypatch):
    """SQLite out of space: the request fails cleanly (no receipt half written, credit released), the node stays."""
    async def scenario():
        node = make_node(tmp_path, model)
        async with serving(node) as (session, _):
            async with session.post("/v1/chat/completions", json=chat(), headers=PAY) as response:
                assert response.status == 200
            original = node.receipt_log.append

            def full(*args, **kwargs):
                raise sqlite3.OperationalError("database or disk is full")

            node.receipt_log.append = full
            async with session.post("/v1/chat/completions", json=chat(), headers=PAY) as response:
                body = await response.json()
                assert response.status == 503 and body["error"]["code"] == "storage_unavailable", body
            node.receipt_log.append = original
            async with session.post("/v1/chat/completions", json=chat(), headers=PAY) as response:
                assert response.status == 200
            assert node.receipt_log.size == 2

    run(scenario())


def test_node_run_with_a_nan_adapter_prints_one_line_not_a_traceback(tmp_path, monkeypatch):
    """The whole `longtail node run` path up to the adapter: keystore, deployment, engine, receipt log."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from longtail.contracts.deployment import Deployment
    from longtail.node.cli import app
    from longtail.node.devnet import ADAPTERS

    if not (embedded_model_dir() / "config.json").exists() or not (ADAPTERS / "legal-r8").exists():
        pytest.skip("embedded base model or shipped adapters missing")
    poisoned = _copy_adapter(ADAPTERS / "legal-r8", tmp_path / "nan-adapter")
    tensors = load_file(poisoned / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, poisoned / "adapter_model.safetensors")
    zero = "0x" + "00" * 19 + "01"
    Deployment(31337, zero, zero, zero, zero, zero, 0).save(tmp_path / "deployment.json")
    monkeypatch.setenv("LONGTAIL_KEY_PASSWORD", "pw")
    result = CliRunner().invoke(app, ["node", "run", "--home", str(tmp_path / "node"), "--adapter", str(poisoned),
                                      "--base-model", str(embedded_model_dir()),
                                      "--chain-rpc", "http://127.0.0.1:9", "--deployment",
                                      str(tmp_path / "deployment.json"), "--no-engine-process", "--p2p-listen", ""])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "adapter rejected" in result.output and ("nan" in result.output.lower() or "finite" in result.output)
