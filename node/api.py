"""The node's HTTP API (aiohttp): OpenAI-compatible inference, vouchers, receipts, log proofs, metrics.

Handlers parse, call the `NodeService`, and serialise; the business logic lives
in the service. Errors become OpenAI-shaped bodies through one middleware and
the table in `node.errors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from longtail.node.errors import BadRequest, NodeError, error_body, mapping_for
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


class NodeService(Protocol):
    """What the HTTP edge needs from a node; `node.service.Node` implements it."""

    max_tokens_limit: int

    def models(self) -> list[dict]: ...
    async def complete(self, request: CompletionRequest, channel_id: str | None, voucher) -> Completion: ...
    def stream(self, request: CompletionRequest, channel_id: str | None, voucher) -> AsyncIterator[dict]: ...
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


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except NodeError as error:
        mapping = mapping_for(error)
        return web.json_response(error_body(error), status=mapping.status)
    except web.HTTPException as error:
        if error.status >= 400:
            body = {"error": {"message": error.reason, "type": "invalid_request_error", "code": error.status}}
            return web.json_response(body, status=error.status)
        raise
    except Exception:
        # Never leak internals (keys, paths) to a client; the log has the traceback.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": {"message": "internal error", "type": "server_error", "code": 500}},
                                 status=500)


async def _json_body(request: web.Request) -> object:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadRequest(f"body larger than {MAX_BODY_BYTES} bytes")
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None


def _int_query(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"query parameter {name} is required", param=name)
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer", param=name) from None
    if value < 0:
        raise BadRequest(f"query parameter {name} must be >= 0", param=name)
    return value


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    parsed = parse_completion(await _json_body(request), chat=chat, max_tokens_limit=service.max_tokens_limit)
    channel_id, voucher = parse_payment_headers(request.headers)
    if not parsed.stream:
        completion = await service.complete(parsed, channel_id, voucher)
        return web.json_response(completion.body, headers={TIMING_HEADER: completion.timing.header()})
    events = service.stream(parsed, channel_id, voucher)
    try:
        # The first event is produced before headers go out, so payment and model errors
        # still answer with their proper status instead of a broken stream.
        first = await anext(events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if "receipt_pending" in first:
            response.headers[RECEIPT_HEADER] = first["receipt_pending"]
        await response.prepare(request)
        async for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
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
    response = web.Response(body=request.app[SERVICE_KEY].metrics())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE_KEY].health())


async def adapter_bundle(request: web.Request) -> web.Response:
    bundle = await request.app[SERVICE_KEY].adapter_bundle(request.match_info["adapter_id"].lower())
    return web.Response(body=bundle, content_type="application/octet-stream")


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SERVICE_KEY].dashboard(), content_type="text/html")


def build_app(service: NodeService) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    app[SERVICE_KEY] = service
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
        web.get("/metrics", metrics),
        web.get("/healthz", health),
    ])
    return app
