"""The node's HTTP API (aiohttp): OpenAI-compatible inference, vouchers, receipts, log proofs, metrics.

Handlers parse, call the `NodeService`, and serialise; the business logic lives
in the service. Errors become OpenAI-shaped bodies through one middleware and
the table in `node.errors`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from longtail.node.errors import (
    BadRequest,
    NodeError,
    PayloadTooLarge,
    RequestTimeout,
    error_body,
    is_known,
    mapping_for,
    retry_after,
)
from longtail.node.payments import authorization_from_headers
from longtail.node.requests import (
    RECEIPT_HEADER,
    CompletionRequest,
    parse_completion,
    parse_payment_headers,
    parse_voucher,
)
from longtail.node.timing import HEADER as TIMING_HEADER

if TYPE_CHECKING:
    from longtail.node.service import Completion

log = logging.getLogger("longtail.api")
MAX_BODY_BYTES = 1 << 20
# Deeper JSON is refused before it is parsed: json's C parser recurses once per level, and a dependency raises
# Python's recursion limit to 100,000, so 100,000 nested brackets overflow the C stack (SIGSEGV) instead of raising.
MAX_JSON_DEPTH = 64
# A client has this long to send its whole body once its headers are in (a slowloris body is cut here; slow
# headers are cut by the server's keepalive_timeout, see SERVER_OPTIONS).
BODY_SECONDS = 30.0
# For web.AppRunner: aiohttp closes a connection that has not completed a request within keepalive_timeout (it
# arms it at connection_made as well as between requests); its default is an hour.
SERVER_OPTIONS = {"keepalive_timeout": 15.0}
QUERY_INT_MAX = 2**62  # sequence numbers; larger ones cannot name a receipt and overflow SQLite's integer


class NodeService(Protocol):
    """What the HTTP edge needs from a node; `node.service.Node` implements it."""

    max_tokens_limit: int

    def models(self) -> list[dict]: ...
    async def complete(self, request: CompletionRequest, channel_id: str | None, voucher,
                       authorization=None) -> Completion: ...
    def stream(self, request: CompletionRequest, channel_id: str | None, voucher,
               authorization=None) -> AsyncIterator[dict]: ...
    async def accept_voucher(self, voucher) -> dict: ...
    async def receipt(self, request_id: str) -> dict: ...
    async def receipts(self, from_seq: int, to_seq: int) -> list[dict]: ...
    async def checkpoint(self) -> dict: ...
    async def inclusion_proof(self, seq: int, size: int) -> dict: ...
    async def consistency_proof(self, first: int, second: int) -> dict: ...
    def metrics(self) -> bytes: ...
    def health(self) -> dict: ...
    def dashboard(self) -> str: ...
    async def adapter_bundle(self, adapter_id: str) -> bytes: ...


SERVICE_KEY = web.AppKey("service", NodeService)
ADAPTERS_KEY = web.AppKey("adapters", object)  # node.adapter_admin.AdapterAdmin: the adapter lifecycle (issue 22)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except NodeError as error:
        mapping = mapping_for(error)
        return web.json_response(error_body(error), status=mapping.status, headers=_retry_header(error))
    except web.HTTPRequestEntityTooLarge:
        error = PayloadTooLarge(f"body larger than {MAX_BODY_BYTES} bytes", limit=MAX_BODY_BYTES)
        return web.json_response(error_body(error), status=413)
    except web.HTTPException as error:
        if error.status >= 400:
            body = {"error": {"message": error.reason, "type": "invalid_request_error", "code": error.status}}
            return web.json_response(body, status=error.status)
        raise
    except Exception as error:
        if is_known(error):  # an engine error the table names (prompt too long for the context, ...)
            return web.json_response(error_body(error), status=mapping_for(error).status,
                                     headers=_retry_header(error))
        # Never leak internals (keys, paths) to a client; the log has the traceback.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(error_body(error), status=500)


def _retry_header(error: BaseException) -> dict[str, str] | None:
    seconds = retry_after(error)
    return {"Retry-After": str(seconds)} if seconds is not None else None


def json_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in JSON text, brackets inside strings not counted; linear, no recursion.

    Vectorised so that a megabyte of brackets costs milliseconds on the event loop: a quote is real when an even
    run of backslashes precedes it, and a byte is inside a string when an odd number of real quotes precede it.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size == 0:
        return 0
    # int32 throughout (bodies are at most MAX_BODY_BYTES): a megabyte's scan holds about 16 MB at its peak.
    index = np.arange(data.size, dtype=np.int32)
    last_other = np.maximum.accumulate(np.where(data == ord("\\"), np.int32(-1), index))
    run_before = np.zeros(data.size, dtype=np.int32)  # backslashes just before each byte
    np.subtract(index[:-1], last_other[:-1], out=run_before[1:])
    del index, last_other
    quote = (data == ord('"')) & (run_before % 2 == 0)
    del run_before
    inside = (np.cumsum(quote, dtype=np.int32) % 2 == 1) & ~quote
    step = (((data == ord("[")) | (data == ord("{"))) & ~inside).astype(np.int8)
    step -= (((data == ord("]")) | (data == ord("}"))) & ~inside).astype(np.int8)
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _check_strings(value: object) -> None:
    """Every string in the body encodes as UTF-8: a lone surrogate ("\\ud800") would fail deep in the tokenizer
    or the receipt's hash instead of here. Iterative: the depth is already bounded, the work is one pass."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts = (item,)
        elif isinstance(item, dict):
            texts = tuple(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("the body holds a string that is not valid Unicode (a lone surrogate such as "
                                 "\\ud800)") from None


def parse_json(raw: bytes) -> object:
    """Bounded JSON: UTF-8 only, depth checked before parsing, strict numbers (no NaN/Infinity), valid Unicode."""
    try:
        # UTF-8 only: json.loads(bytes) would also take UTF-16/32, whose bytes can fake a quote (U+2200 is 00 22 in
        # UTF-16LE) and hide brackets from the depth scan; in UTF-8 every byte below 0x80 is the ASCII it says.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"body is not valid UTF-8: {str(error)[:200]}") from None
    # Only a body with more brackets than the limit can be too deep; the common case skips the scan.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text or "null", parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:  # ValueError covers JSONDecodeError and 5000-digit integers
        raise BadRequest(f"body is not valid JSON: {str(error)[:200]}") from None
    _check_strings(body)
    return body


async def _json_body(request: web.Request) -> object:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body larger than {MAX_BODY_BYTES} bytes", limit=MAX_BODY_BYTES)
    try:
        async with asyncio.timeout(BODY_SECONDS):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {BODY_SECONDS:g} s") from None
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body larger than {MAX_BODY_BYTES} bytes", limit=MAX_BODY_BYTES)
    return parse_json(raw)


def _int_query(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"query parameter {name} is required", param=name)
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 20:
        raise BadRequest(f"query parameter {name} must be a non-negative integer", param=name)
    value = int(raw)
    if value > QUERY_INT_MAX:
        raise BadRequest(f"query parameter {name} must be at most {QUERY_INT_MAX}", param=name)
    return value


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    parsed = parse_completion(await _json_body(request), chat=chat, max_tokens_limit=service.max_tokens_limit)
    channel_id, voucher = parse_payment_headers(request.headers)
    authorization = authorization_from_headers(request.headers, channel_id, parsed)
    if not parsed.stream:
        completion = await service.complete(parsed, channel_id, voucher, authorization)
        return web.json_response(completion.body, headers={TIMING_HEADER: completion.timing.header()})
    events = service.stream(parsed, channel_id, voucher, authorization)
    try:
        # The first event is produced before headers go out, so payment and model errors
        # still answer with their proper status instead of a broken stream.
        first = await anext(events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if "receipt_pending" in first:
            response.headers[RECEIPT_HEADER] = first["receipt_pending"]
        await response.prepare(request)
        try:
            async for event in events:
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client is gone: nobody to tell
        except Exception as error:
            # The status line is out: the error travels as an event (OpenAI's shape), then the stream ends, so
            # the client stops waiting instead of hanging on an open, silent stream.
            if not is_known(error):
                log.exception("stream failed after its headers on %s", request.path)
            await response.write(f"data: {json.dumps(error_body(error))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        await events.aclose()  # a client gone mid-stream: the request releases its credit now, not at GC


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": request.app[SERVICE_KEY].models()})


async def vouchers(request: web.Request) -> web.Response:
    voucher = parse_voucher(await _json_body(request))
    return web.json_response(await request.app[SERVICE_KEY].accept_voucher(voucher))


async def receipt(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE_KEY].receipt(request.match_info["request_id"].lower()))


async def receipts(request: web.Request) -> web.Response:
    from_seq = _int_query(request, "from_seq", 0)
    to_seq = _int_query(request, "to_seq", from_seq + 100)
    if to_seq < from_seq or to_seq - from_seq > 1000:
        raise BadRequest("to_seq must be >= from_seq and at most 1000 receipts per page")
    return web.json_response({"receipts": await request.app[SERVICE_KEY].receipts(from_seq, to_seq)})


async def checkpoint(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE_KEY].checkpoint())


async def proof(request: web.Request) -> web.Response:
    seq, size = _int_query(request, "seq"), _int_query(request, "size")
    return web.json_response(await request.app[SERVICE_KEY].inclusion_proof(seq, size))


async def consistency(request: web.Request) -> web.Response:
    first, second = _int_query(request, "first"), _int_query(request, "second")
    return web.json_response(await request.app[SERVICE_KEY].consistency_proof(first, second))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE_KEY].metrics()
    if ADAPTERS_KEY in request.app:  # the engine's adapter tiers and per-adapter counters
        body += await request.app[ADAPTERS_KEY].metrics_text()
    # The whole header value (version and charset): Prometheus picks its parser by it.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _adapter_admin(request: web.Request):
    if ADAPTERS_KEY not in request.app:
        raise web.HTTPNotFound()
    return request.app[ADAPTERS_KEY]


async def list_adapters(request: web.Request) -> web.Response:
    return web.json_response(await _adapter_admin(request).list())


async def add_adapter(request: web.Request) -> web.Response:
    admin = _adapter_admin(request)
    admin.check_operator(request.headers.get("Authorization"))  # before reading a stranger's body
    return web.json_response(await admin.add(await _json_body(request), request.headers.get("Authorization")),
                             status=201)


async def delete_adapter(request: web.Request) -> web.Response:
    return web.json_response(await _adapter_admin(request).remove(request.match_info["adapter_id"],
                                                                  request.headers.get("Authorization")))


async def health(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE_KEY].health())


async def adapter_bundle(request: web.Request) -> web.Response:
    bundle = await request.app[SERVICE_KEY].adapter_bundle(request.match_info["adapter_id"].lower())
    return web.Response(body=bundle, content_type="application/octet-stream")


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SERVICE_KEY].dashboard(), content_type="text/html")


def build_app(service: NodeService, adapters=None) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    app[SERVICE_KEY] = service
    if adapters is not None:
        app[ADAPTERS_KEY] = adapters
    app.add_routes([
        web.get("/", dashboard),
        web.get("/v1/models", models),
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/vouchers", vouchers),
        web.get("/v1/receipts/{request_id}", receipt),
        web.get("/v1/receipts", receipts),
        web.get("/v1/log/checkpoint", checkpoint),
        web.get("/v1/log/proof", proof),
        web.get("/v1/log/consistency", consistency),
        web.get("/v1/adapters/{adapter_id}/bundle", adapter_bundle),
        web.get("/v1/adapters", list_adapters),
        web.post("/v1/adapters", add_adapter),
        web.delete("/v1/adapters/{adapter_id}", delete_adapter),
        web.get("/metrics", metrics),
        web.get("/healthz", health),
    ])
    return app
