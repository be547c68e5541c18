"""The node: one object that turns a paid request into an answer, a signed receipt and a log entry.

It owns no policy of its own: payments decide admission (`node.payments`),
the engine generates (`serving`), the attributor weighs Datanets
(`node.attributor`), the receipt log signs and persists (`attribution.store`).
The order of one request is fixed by DESIGN.md: check payment, generate,
attribute, sign + append (durable), settle, answer. Nothing is computed per
request after the answer: what an adapter's data is worth is scored once per
adapter, on held-out records, by the attributor (docs/attribution.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator

import sqlalchemy.exc

from longtail.attribution.receipts import ReceiptDraft, SignedReceipt, keccak
from longtail.attribution.store import ChannelVoucher, ReceiptLog
from longtail.node.attributor import Attribution, Attributor
from longtail.node.catalog import Catalog, CatalogEntry
from longtail.node.config import NodeConfig
from longtail.node.dashboard import render_dashboard
from longtail.node.errors import (
    AdapterUnavailable,
    BadRequest,
    NodeBusy,
    NodeError,
    NotFound,
    PromptTooLarge,
    StorageUnavailable,
    UnknownModel,
)
from longtail.node.generation import GenerationGateway, GenerationResult
from longtail.node.metrics import NodeMetrics
from longtail.node.payments import PaymentIntake, Voucher, authorization_from_headers, price_for_tokens
from longtail.node.requests import CompletionRequest
from longtail.node.timing import StageTimes

log = logging.getLogger("longtail.node")

# What a failing receipt store raises (disk full, database unreachable): a 503 for the client, not a bug's 500.
STORE_FAILURES = (OSError, sqlite3.OperationalError, sqlalchemy.exc.OperationalError)
# Prompts longer than this (characters) are tokenised on a worker thread: a megabyte takes the tokenizer about a
# second, and on the event loop that second would stall every other client (and /healthz) with it.
TOKENIZE_INLINE_CHARS = 4096


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def hex32(data: bytes) -> str:
    return "0x" + data.hex()


def _is_adapter_id(value: str) -> bool:
    return value.startswith("0x") and len(value) == 66 and all(c in "0123456789abcdefABCDEF" for c in value[2:])


def prompt_text_as_received(request: CompletionRequest) -> str:
    """What promptHash covers: the prompt string, or the chat messages as canonical JSON."""
    if request.prompt is not None:
        return request.prompt
    return json.dumps(list(request.messages or ()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Completion:
    """A non-streamed answer: the OpenAI-shaped body, and where the node's time went (Server-Timing)."""

    body: dict
    timing: StageTimes


class Node:
    """Serves paid, attributed, receipted inference; see the module docstring for the order of work."""

    def __init__(self, config: NodeConfig, address: str, catalog: Catalog, generation: GenerationGateway,
                 receipt_log: ReceiptLog, payments: PaymentIntake, attributor: Attributor, base_model_id: str,
                 metrics: NodeMetrics | None = None, peer_id: str | None = None) -> None:
        self.config = config
        self.address = address
        self.catalog = catalog
        self.generation = generation
        self.receipt_log = receipt_log
        self.payments = payments
        self.attributor = attributor
        self.base_model_id = base_model_id
        self.stats = metrics or NodeMetrics.create()
        self.peer_id = peer_id
        self.p2p_addrs: list[str] = []
        self.max_tokens_limit = config.max_tokens_limit
        self._in_flight = 0
        self._recent: list[dict] = []
        self._owed_after: dict[str, int] = {}
        self.adapter_fetcher = None  # async (adapter_id) -> CatalogEntry, set by the runner
        self.adapter_store = None
        # One fetch per adapter id, shared by every request for it; fetches of different adapters run side by side.
        self._fetches: dict[str, asyncio.Task] = {}
        self.started_at = int(time.time())
        self._end_token_ids: frozenset[int] | None = None
        self.checkpointer = None  # set by the runner when a chain is configured
        self.adapter_bindings = None  # AdapterBindings, set by the runner when a chain is configured (issue 20, attack 5)
        self.stats.log_size.set(receipt_log.size)

    # --- inference ------------------------------------------------------------------------------

    async def _resolve(self, model: str) -> CatalogEntry:
        """The catalog entry for `model`; an adapter id this node lacks is fetched from a peer just in time."""
        try:
            return self.catalog.resolve(model)
        except UnknownModel:
            if self.adapter_fetcher is None or not _is_adapter_id(model):
                raise
        adapter_id = model.lower()
        fetch = self._fetches.get(adapter_id)
        if fetch is None:
            fetch = asyncio.create_task(self._fetch_adapter(adapter_id), name=f"fetch-{adapter_id}")
            self._fetches[adapter_id] = fetch
            fetch.add_done_callback(self._fetch_done)
        # shield: a client that leaves does not cancel the fetch the other waiters (and the next request) share.
        await asyncio.shield(fetch)
        return self.catalog.resolve(model)

    def _fetch_done(self, task: asyncio.Task) -> None:
        self._fetches.pop(task.get_name().removeprefix("fetch-"), None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have left before it failed

    async def _fetch_adapter(self, adapter_id: str) -> None:
        if self.catalog.by_adapter_id(adapter_id) is not None:
            return
        try:
            entry = await self.adapter_fetcher(adapter_id)
        except NodeError:
            raise
        except Exception as error:  # the chain or a peer failed (a ChainError, a broken connection): not a bug here
            log.warning("fetching adapter %s failed: %s: %s", adapter_id, type(error).__name__, error)
            raise AdapterUnavailable(f"adapter {adapter_id} is not served here and could not be looked up or "
                                     f"fetched right now ({type(error).__name__}); retry later", param="model",
                                     retry_after_seconds=5) from None
        self.catalog.add(entry)

    async def _prepare(self, request: CompletionRequest, times: StageTimes) -> list[int]:
        # Tokenizing is the engine's side of the work: the unpaid baseline of bench_node times it too.
        with times.stage("engine"):
            if self._prompt_chars(request) > TOKENIZE_INLINE_CHARS:
                prompt_ids = await asyncio.to_thread(self.generation.encode, request)
            else:
                prompt_ids = self.generation.encode(request)
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise PromptTooLarge(f"prompt is {len(prompt_ids)} tokens; this node accepts at most "
                                 f"{self.config.max_prompt_tokens}", param="prompt",
                                 prompt_tokens=len(prompt_ids), limit=self.config.max_prompt_tokens)
        if self._in_flight >= self.config.max_waiting_requests:
            raise NodeBusy(f"{self._in_flight} requests in flight; retry shortly", retry_after_seconds=1)
        return prompt_ids

    async def _admit(self, request: CompletionRequest, channel_id: str | None, voucher: Voucher | None,
                     times: StageTimes, authorization=None):
        # Payment first (issue 20, attacks 8 and 10): no peer fetch, engine or chain write for a request that its
        # channel's client did not sign.
        with times.stage("payment"):
            await self.payments.authorize(channel_id, authorization)
        entry = await self._resolve(request.model)
        if self.adapter_bindings is not None:  # a squatted registration is refused before any engine work
            await self.adapter_bindings.check(entry)
        prompt_ids = await self._prepare(request, times)
        max_price = price_for_tokens(entry.price_per_1k_tokens, len(prompt_ids) + request.max_tokens)
        with times.stage("payment"):
            reservation = await self.payments.reserve(channel_id, voucher, max_price)
        # The reservation may have waited on the chain (a cold channel): the admission limit is checked again with
        # no await before the caller counts the request in flight, so cold channels get no more than warm ones.
        if self._in_flight >= self.config.max_waiting_requests:
            await self.payments.release(reservation)
            raise NodeBusy(f"{self._in_flight} requests in flight; retry shortly", retry_after_seconds=1)
        return entry, prompt_ids, reservation

    @staticmethod
    def _prompt_chars(request: CompletionRequest) -> int:
        if request.prompt is not None:
            return len(request.prompt)
        # Each message also costs the chat template a loop turn: 30,000 empty messages are slow with no text.
        return sum(len(m["content"]) + 64 for m in request.messages or ())

    async def _finish(self, request: CompletionRequest, entry: CatalogEntry, prompt_ids: list[int],
                      result: GenerationResult, reservation, request_id: str, times: StageTimes) -> SignedReceipt:
        """Attribute, sign and durably append the receipt, then charge the channel."""
        answer_ids = self.answer_ids(result)
        price = price_for_tokens(entry.price_per_1k_tokens, len(prompt_ids) + len(answer_ids))
        with times.stage("receipt"):
            # Signing and the append stay on the event loop, not a worker thread: ~1 ms of work, and under load each
            # of a worker's two hand-offs waited about as long (docs/node.md, "Latency"). The span search, which
            # grows with the answer and the Datanets, runs in a worker thread (docs/attribution.md, issue 23).
            try:
                attribution = (await self.attributor.attribute_async(entry, answer_ids)
                               if self.attributor.searches(entry) else None)
                signed, attribution = self._attribute_and_append(request, entry, prompt_ids, result, reservation,
                                                                 request_id, price, attribution)
            except STORE_FAILURES as error:
                await self.payments.release(reservation)
                log.error("receipt for request %s not stored: %s", request_id, error)
                raise StorageUnavailable("the node cannot store receipts right now (its store is failing); "
                                         "nothing was charged", retry_after_seconds=5) from None
            except Exception:
                await self.payments.release(reservation)
                raise
        with times.stage("payment"):
            owed = await self.payments.settle(reservation, price)
        self.stats.receipts.inc()
        self.stats.earnings.inc(price)
        self.stats.log_size.set(self.receipt_log.size)
        self.stats.tokens.labels("prompt").inc(len(prompt_ids))
        self.stats.tokens.labels("output").inc(len(answer_ids))
        self._remember(entry, signed, attribution)
        if self.checkpointer is not None:
            self.checkpointer.notify_receipt()
        self._owed_after[signed.receipt.request_id] = owed
        return signed

    def _attribute_and_append(self, request: CompletionRequest, entry: CatalogEntry, prompt_ids: list[int],
                              result: GenerationResult, reservation, request_id: str, price: int,
                              attribution: Attribution | None = None) -> tuple[SignedReceipt, Attribution]:
        """Blocking: weigh the Datanets (unless already weighed), then sign and commit the receipt (durable when
        this returns)."""
        answer_ids = self.answer_ids(result)
        if attribution is None:
            attribution = self.attributor.attribute(entry, answer_ids)
        draft = ReceiptDraft(
            request_id=request_id,
            client=reservation.client,
            channel_id=reservation.channel_id,
            base_model_id=self.base_model_id,
            adapter_id=entry.receipt_adapter_id,
            prompt_hash=hex32(keccak(prompt_text_as_received(request).encode("utf-8"))),
            output_hash=hex32(keccak(result.text.encode("utf-8"))),
            prompt_tokens=len(prompt_ids),
            output_tokens=len(answer_ids),
            price=price,
            timestamp=int(time.time()),
            attribution=attribution.vector,
            spans=attribution.spans,
        )
        # The commit happens before the answer leaves: a receipt handed out is durable. The channel's voucher still
        # only in memory (this request's, or one a concurrent request brought) goes in the same transaction: no
        # answer leaves while the node holds a voucher it has not stored.
        voucher = self.payments.unstored_voucher(reservation.channel_id)
        vouchers = () if voucher is None else (ChannelVoucher(
            reservation.channel_id, reservation.client, voucher.cumulative_amount, voucher.signature),)
        signed = self.receipt_log.append(draft, vouchers)
        if voucher is not None:
            self.payments.mark_stored(reservation.channel_id, voucher)
        return signed, attribution

    async def drain(self) -> None:
        """At shutdown, before the engine stops: the background work that uses the engine (the attributor's
        data-credit scorings) is cancelled; the next start scores what was left."""
        await self.attributor.close()

    def _longtail_field(self, signed: SignedReceipt) -> dict:
        """The receipt body, plus the cumulative amount the client's next voucher must cover."""
        body = signed.to_json()
        body["payCumulative"] = str(self._owed_after.pop(signed.receipt.request_id, signed.receipt.price))
        return body

    async def complete(self, request: CompletionRequest, channel_id: str | None,
                       voucher: Voucher | None, authorization=None) -> Completion:
        started = time.perf_counter()
        times = StageTimes()
        endpoint = "chat" if request.chat else "completions"
        entry, prompt_ids, reservation = await self._admit(request, channel_id, voucher, times, authorization)
        request_id = hex32(os.urandom(32))
        self._in_flight += 1
        try:
            with times.stage("engine"):
                result = await self.generation.generate(request, entry, prompt_ids)
        except BaseException:
            await self.payments.release(reservation)
            self.stats.requests.labels(endpoint, "error").inc()
            raise
        finally:
            self._in_flight -= 1
        if result.first_token_seconds is not None:
            self.stats.ttft.observe(result.first_token_seconds)
        signed = await self._finish(request, entry, prompt_ids, result, reservation, request_id, times)
        body = self._openai_body(request, entry, request_id, result, prompt_ids, signed)
        self.stats.requests.labels(endpoint, "ok").inc()
        elapsed = time.perf_counter() - started
        self.stats.latency.observe(elapsed)
        times.add("total", elapsed)
        return Completion(body, times)

    async def stream(self, request: CompletionRequest, channel_id: str | None,
                     voucher: Voucher | None, authorization=None) -> AsyncIterator[dict]:
        started = time.perf_counter()
        times = StageTimes()  # headers leave before these are known: a stream carries no Server-Timing
        entry, prompt_ids, reservation = await self._admit(request, channel_id, voucher, times, authorization)
        request_id = hex32(os.urandom(32))
        self._in_flight += 1
        try:
            async with contextlib.aclosing(self.generation.stream(request, entry, prompt_ids)) as partials:
                # The engine's first answer is awaited before the headers: an engine that is down or restarting,
                # or a request it refuses, keeps its own status (503, 400) instead of a 200 stream ending in an error.
                first = await anext(partials, None)
                # First event: consumed by the HTTP edge before headers go out (carries the receipt's id). Inside
                # the try: an edge that fails before the headers closes the stream here, and the reservation is
                # released.
                yield {"receipt_pending": request_id}
                result = None
                sent = 0  # tokens whose log-probabilities went out (a token held back with its text waits for it)
                async for partial in _prepend(first, partials):
                    if partial.delta:
                        chunk = self._chunk(request, entry, request_id, partial.delta, None)
                        if request.logprobs:
                            upto = len(partial.token_ids)
                            chunk["choices"][0]["logprobs"] = {"content": self._token_logprobs(
                                partial.token_ids[sent:upto], partial.logprobs[sent:upto])}
                            sent = upto
                        yield chunk
                    result = partial
            if result is None:
                raise BadRequest("the engine produced no output for this request")
        except BaseException:
            await self.payments.release(reservation)
            raise
        finally:
            self._in_flight -= 1
        signed = await self._finish(request, entry, prompt_ids, result, reservation, request_id, times)
        final = self._chunk(request, entry, request_id, "", result.finish_reason)
        final["usage"] = self._usage(prompt_ids, self.answer_ids(result))
        final["longtail"] = self._longtail_field(signed)
        self.stats.requests.labels("stream", "ok").inc()
        self.stats.latency.observe(time.perf_counter() - started)
        yield final
        if request.include_usage:  # OpenAI's stream_options.include_usage: one more chunk, no choices, the usage
            usage_chunk = self._chunk(request, entry, request_id, "", None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = final["usage"]
            yield usage_chunk

    def answer_ids(self, result: GenerationResult) -> list[int]:
        """The answer's tokens as counted and charged: the end-of-sequence token that stopped it is no part of the
        answer's text, so an empty completion costs no output token (OpenAI counts it the same way)."""
        ids = result.token_ids
        if ids and result.finish_reason == "stop" and ids[-1] in self._end_ids():
            return ids[:-1]
        return ids

    def _end_ids(self) -> frozenset[int]:
        if self._end_token_ids is None:
            tokenizer = getattr(self.generation, "tokenizer", None)
            ids = set(getattr(tokenizer, "all_special_ids", None) or ())
            eos = getattr(tokenizer, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            self._end_token_ids = frozenset(ids)
        return self._end_token_ids

    def _token_logprobs(self, token_ids: list[int], logprobs) -> list[dict]:
        """OpenAI's `logprobs.content`: each answer token's text, bytes and log-probability (no alternatives)."""
        tokenizer = self.generation.tokenizer
        entries = []
        for token_id, logprob in zip(token_ids, logprobs, strict=False):  # the end token has no entry
            text = tokenizer.decode([token_id])
            entries.append({"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8")),
                            "top_logprobs": []})
        return entries

    def _usage(self, prompt_ids: list[int], output_ids: list[int]) -> dict:
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(output_ids),
                "total_tokens": len(prompt_ids) + len(output_ids)}

    def _chunk(self, request: CompletionRequest, entry: CatalogEntry, request_id: str, text: str,
               finish_reason: str | None) -> dict:
        if request.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason}
            kind = "text_completion"
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": entry.name,
                "choices": [choice]}

    def _openai_body(self, request: CompletionRequest, entry: CatalogEntry, request_id: str,
                     result: GenerationResult, prompt_ids: list[int], signed: SignedReceipt) -> dict:
        if request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason}
            if request.logprobs:
                choice["logprobs"] = {"content": self._token_logprobs(self.answer_ids(result), result.logprobs)}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason}
            kind = "text_completion"
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": entry.name,
                "choices": [choice], "usage": self._usage(prompt_ids, self.answer_ids(result)),
                "longtail": self._longtail_field(signed)}

    def _remember(self, entry: CatalogEntry, signed: SignedReceipt, attribution: Attribution) -> None:
        names = {d.datanet_id: d.name for d in entry.datanets}
        top = attribution.top_datanet
        self._recent.append({**signed.to_json(), "model": entry.name,
                             "top_datanet": names.get(top, top) if top else None})
        del self._recent[:-50]

    async def handle_peer_request(self, message: dict) -> dict:
        """An inference request that arrived over libp2p: same body and payment headers as over HTTP."""
        from longtail.node.errors import error_body, is_known, mapping_for
        from longtail.node.requests import parse_completion, parse_payment_headers

        path = message.get("path", "/v1/chat/completions")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return {"status": 404, "body": {"error": {"message": f"no route {path} over libp2p"}}}
        try:
            request = parse_completion(message.get("body"), chat=path.endswith("chat/completions"),
                                       max_tokens_limit=self.max_tokens_limit)
            if request.stream:
                raise BadRequest("streaming is not offered over libp2p; send stream=false", param="stream")
            headers = message.get("headers") or {}
            if not isinstance(headers, dict):
                raise BadRequest("headers must be an object")
            channel_id, voucher = parse_payment_headers(headers)
            authorization = authorization_from_headers(headers, channel_id, request)
            return {"status": 200, "body": (await self.complete(request, channel_id, voucher, authorization)).body}
        except Exception as error:  # the same table as over HTTP; a bug is an opaque 500 with its traceback logged
            if not is_known(error):
                log.exception("libp2p inference request failed")
            return {"status": mapping_for(error).status, "body": error_body(error)}

    # --- payments -------------------------------------------------------------------------------

    async def accept_voucher(self, voucher: Voucher) -> dict:
        account = await self.payments.accept_voucher(voucher)
        return {"channel_id": account.channel_id, "accepted_cumulative": str(account.paid),
                "owed": str(account.owed)}

    # --- receipts and log -----------------------------------------------------------------------

    async def receipt(self, request_id: str) -> dict:
        bodies = await asyncio.to_thread(self.receipt_log.store.bodies_for_request, request_id)
        if not bodies:
            raise NotFound(f"no receipt for request {request_id} on this node")
        return json.loads(bodies[0])

    async def receipts(self, from_seq: int, to_seq: int) -> list[dict]:
        bodies = await asyncio.to_thread(self.receipt_log.store.bodies, self.address, from_seq, to_seq - from_seq)
        return [json.loads(b) for b in bodies]

    async def checkpoint(self) -> dict:
        size = self.receipt_log.size
        posted = [c for c in self.receipt_log.store.checkpoints(self.address) if c.epoch is not None]
        return {"node": self.address, "tree_size": size, "root_hash": hex32(self.receipt_log.root(size)),
                "last_posted": ({"tree_size": posted[-1].tree_size, "root_hash": posted[-1].root,
                                 "epoch": posted[-1].epoch} if posted else None)}

    async def inclusion_proof(self, seq: int, size: int) -> dict:
        if not seq < size <= self.receipt_log.size:
            raise BadRequest(f"need seq < size <= {self.receipt_log.size}", seq=seq, size=size)
        proof = self.receipt_log.inclusion_proof(seq, size)
        leaf = self.receipt_log.tree.leaf(seq)
        return {"seq": seq, "size": size, "leaf_hash": hex32(leaf), "root_hash": hex32(self.receipt_log.root(size)),
                "proof": [hex32(p) for p in proof]}

    async def consistency_proof(self, first: int, second: int) -> dict:
        if not 0 < first <= second <= self.receipt_log.size:
            raise BadRequest(f"need 0 < first <= second <= {self.receipt_log.size}", first=first, second=second)
        proof = self.receipt_log.consistency_proof(first, second)
        return {"first": first, "second": second, "first_root": hex32(self.receipt_log.root(first)),
                "second_root": hex32(self.receipt_log.root(second)), "proof": [hex32(p) for p in proof]}

    async def adapter_bundle(self, adapter_id: str) -> bytes:
        """An adapter's verified bytes for a peer; only adapters this node serves are shared."""
        entry = self.catalog.by_adapter_id(adapter_id) if _is_adapter_id(adapter_id) else None
        if entry is None or self.adapter_store is None:
            raise NotFound(f"this node does not serve adapter {adapter_id}")
        return await asyncio.to_thread(self.adapter_store.open_bundle, adapter_id)

    # --- operations -----------------------------------------------------------------------------

    def models(self) -> list[dict]:
        # `created` is required by OpenAI's Model type; an entry is as old as this node's catalog.
        return [{"created": self.started_at, **entry.to_json()} for entry in self.catalog.entries()]

    def metrics(self) -> bytes:
        return self.stats.render()

    def health(self) -> dict:
        return {"status": "ok", "node": self.address, "log_size": self.receipt_log.size,
                "in_flight": self._in_flight, "peer_id": self.peer_id, "p2p_addrs": self.p2p_addrs}

    def dashboard(self) -> str:
        earnings = {f"charged in the last {len(self._recent)} receipts": sum(int(r["receipt"]["price"]) for r in self._recent)}
        for account in self.payments.accounts():
            earnings[f"channel {account.channel_id[:10]}… vouchers"] = account.paid
        checkpoints = [{"tree_size": c.tree_size, "root_hash": c.root, "epoch": c.epoch,
                        "posted_at": time.strftime("%H:%M:%S", time.localtime(c.created_at))}
                       for c in self.receipt_log.store.checkpoints(self.address)]
        node = {"name": self.config.name, "address": self.address, "peer_id": self.peer_id,
                "log_size": self.receipt_log.size}
        return render_dashboard(node, self.models(), list(reversed(self._recent)), earnings, checkpoints)
