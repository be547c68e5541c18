"""The HTTP edge under hostile bytes: no crash, an OpenAI-shaped 4xx for every known condition, no hang.

The edge is the subject here, so the service behind it is a small recorder: a bad request must be refused
before the service is reached (nothing is tokenised, reserved or generated for it). The node itself under
faults is in test_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from yarl import URL

from longtail.node import api
from longtail.node.api import json_depth, parse_json
from longtail.node.errors import BadRequest, EngineDown
from longtail.node.metrics import NodeMetrics
from longtail.serving.errors import NonFiniteLogits, PromptTooLong

from http_edge import serving

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD_CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class RecordingService:
    """Answers like a node would, and records every request that got past the edge."""

    max_tokens_limit = 64

    def __init__(self, stream_failure: BaseException | None = None) -> None:
        self.calls: list = []
        self.stream_failure = stream_failure
        self.stats = NodeMetrics.create()

    def models(self) -> list[dict]:
        return [{"id": "base", "object": "model", "owned_by": "longtail", "created": 1}]

    async def complete(self, request, channel_id, voucher, authorization=None):
        from longtail.node.service import Completion
        from longtail.node.timing import StageTimes

        self.calls.append(request)
        return Completion({"id": "x", "object": "chat.completion", "created": 1, "model": "base",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}, StageTimes())

    async def stream(self, request, channel_id, voucher, authorization=None):
        self.calls.append(request)
        yield {"receipt_pending": "0x" + "ab" * 32}
        yield {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "base",
               "choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": None}]}
        if self.stream_failure is not None:
            raise self.stream_failure
        yield {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "base",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    async def receipts(self, from_seq, to_seq):
        self.calls.append((from_seq, to_seq))
        return []

    def metrics(self) -> bytes:
        return self.stats.render()

    def health(self) -> dict:
        return {"status": "ok"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def assert_openai_error(status: int, body: dict, expected_status: int, param: str | None = None) -> None:
    assert status == expected_status, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    if param is not None:
        assert error.get("param") == param, body


# --- the crash: nested brackets ------------------------------------------------------------------

def test_deep_nesting_is_refused_before_the_parser_that_would_overflow_the_c_stack():
    """Under the recursion limit a dependency sets (py_ecc: 100,000), json.loads of 100,000 nested brackets kills
    the process; the edge's parser refuses it with a 400 in the same conditions."""
    bomb = "b'[' * 100_000 + b']' * 100_000"
    unguarded = subprocess.run([sys.executable, "-P", "-c", f"import sys, json; sys.setrecursionlimit(100_000); "
                                f"json.loads({bomb})"], capture_output=True, timeout=120)
    assert unguarded.returncode < 0, "the payload no longer crashes json.loads; the test lost its witness"
    guarded = subprocess.run([sys.executable, "-P", "-c", "import sys; sys.setrecursionlimit(100_000)\n"
                              "from longtail.node.api import parse_json\nfrom longtail.node.errors import BadRequest\n"
                              f"try:\n    parse_json({bomb})\nexcept BadRequest as e:\n    print(e.message)"],
                             capture_output=True, text=True, timeout=120)
    assert guarded.returncode == 0, guarded.stderr
    assert "nested deeper than" in guarded.stdout


def test_nested_bracket_body_gets_400_and_the_node_keeps_serving():
    async def scenario():
        service = RecordingService()
        async with serving(service) as (session, _):
            for path in (COMPLETIONS, CHAT, "/v1/vouchers"):
                async with session.post(path, data=b"[" * 100_000 + b"]" * 100_000) as response:
                    assert_openai_error(response.status, await response.json(), 400)
            async with session.post(CHAT, json=GOOD_CHAT) as response:
                assert response.status == 200
        assert len(service.calls) == 1

    run(scenario())


def test_depth_scan_ignores_brackets_inside_strings_and_escaped_quotes():
    assert json_depth(b'{"a": "[[[[[[", "b": [[1]]}') == 3
    assert json_depth(b'{"a": "\\"[[[[", "b": 1}') == 1
    assert json_depth(b'{"a": "\\\\", "b": [[[1]]]}') == 4  # an escaped backslash does not escape the quote
    # json.loads(bytes) would read this as UTF-16 (its BOM), where U+2200's bytes 00 22 look like a quote to a
    # byte scan; only UTF-8 is taken, so the scan and the parser always read the same characters.
    utf16_bomb = ("\ufeff" + '"\u2200"' + "[" * 10_000).encode("utf-16-le")
    with pytest.raises(BadRequest, match="UTF-8"):
        parse_json(utf16_bomb)
    deep_in_string = b'{"prompt": "' + b"[" * 10_000 + b'"}'
    assert parse_json(deep_in_string)["prompt"] == "[" * 10_000
    started = time.perf_counter()
    with pytest.raises(BadRequest):
        parse_json(b"{" * (1 << 19) + b"}" * (1 << 19))
    assert time.perf_counter() - started < 1.0


# --- bad values: each a 400 naming the parameter, the service never reached ----------------------

BAD_BODIES = [
    (COMPLETIONS, '{"model": "base", "prompt": "a\\ud800b"}', None),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "a\\udfffb"}]}', None),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "max_tokens"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}', None),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "top_k": NaN}', None),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', None),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": -1e-9}',
     "temperature"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}', "top_p"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}', "max_tokens"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 300 + "}",
     "max_tokens"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}",
     None),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
     "seed"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "seed": 1.5}', "seed"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": "false"}', "stream"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": 1}', "stream"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}', "logprobs"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 3}',
     "top_logprobs"),
    (COMPLETIONS, '{"model": "base", "prompt": "hi", "logprobs": 2}', "logprobs"),
    (COMPLETIONS, '{"model": "base", "prompt": "hi", "logprobs": 0}', "logprobs"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], '
           '"response_format": {"type": "json_object"}}', "response_format"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream_options": '
           '{"include_usage": true}}', "stream_options"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
     "tools"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", '
           '"image_url": {"url": "x"}}]}]}', "messages"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": []}]}', "messages"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "messages"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}',
     "presence_penalty"),
    (CHAT, '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "user": 7}', "user"),
    (CHAT, "\xff\xfe{}", None),
]


def test_bad_values_get_an_openai_shaped_400_before_any_work():
    async def scenario():
        service = RecordingService()
        async with serving(service) as (session, _):
            for path, body, param in BAD_BODIES:
                raw = body.encode("utf-8", "surrogateescape") if body.startswith("\xff") else body.encode()
                async with session.post(path, data=raw, headers={"Content-Type": "application/json"}) as response:
                    assert_openai_error(response.status, await response.json(), 400, param)
        assert service.calls == []

    run(scenario())


def test_receipts_query_numbers_are_bounded():
    async def scenario():
        service = RecordingService()
        async with serving(service) as (session, _):
            for query in ("from_seq=18446744073709551616", "from_seq=-1", "from_seq=1e3", "from_seq=" + "9" * 5000,
                          "from_seq=%D9%A3"):  # an Arabic-Indic digit: int() would take it
                async with session.get(f"/v1/receipts?{query}") as response:
                    assert_openai_error(response.status, await response.json(), 400, "from_seq")
            async with session.get("/v1/receipts?from_seq=4611686018427387904") as response:
                assert response.status == 200
        assert service.calls == [(2**62, 2**62 + 100)]

    run(scenario())


def test_accepted_shapes_reach_the_service_as_openai_means_them():
    async def scenario():
        service = RecordingService()
        async with serving(service) as (session, _):
            parts = {**GOOD_CHAT, "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}],
                "n": 1, "stream": False, "response_format": {"type": "text"}, "temperature": 1e-40, "top_p": 0,
                "seed": 2**63 - 1, "max_tokens": 4.0, "presence_penalty": 0}
            async with session.post(CHAT, json=parts) as response:
                assert response.status == 200, await response.text()
        request = service.calls[0]
        assert request.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "one\ntwo"})
        assert (request.stream, request.temperature, request.top_p, request.seed, request.max_tokens) == \
               (False, 1e-40, 0.0, 2**63 - 1, 4)

    run(scenario())


# --- size and time limits --------------------------------------------------------------------------

def test_oversized_body_is_413_declared_or_not():
    async def scenario():
        service = RecordingService()
        async with serving(service) as (session, _):
            big = b'{"model": "base", "prompt": "' + b"a" * (api.MAX_BODY_BYTES + 10) + b'"}'
            async with session.post(COMPLETIONS, data=big) as response:
                assert_openai_error(response.status, await response.json(), 413)

            async def chunks():  # chunked: no Content-Length to refuse early
                for _ in range(20):
                    yield b"a" * (1 << 16)

            async with session.post(COMPLETIONS, data=chunks()) as response:
                assert_openai_error(response.status, await response.json(), 413)
        assert service.calls == []

    run(scenario())


async def _raw_connection(url):
    reader, writer = await asyncio.open_connection(URL(url).host, URL(url).port)
    return reader, writer


def test_slow_clients_are_cut_by_the_server(monkeypatch):
    """Slowloris: headers that never finish are closed at keepalive_timeout; a body that drips gets 408."""
    monkeypatch.setattr(api, "BODY_SECONDS", 0.5)

    async def scenario():
        service = RecordingService()
        async with serving(service, keepalive_timeout=0.5) as (session, address):
            reader, writer = await _raw_connection(address)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            started = time.perf_counter()
            for _ in range(10):  # one header line every 0.2 s would keep a per-read timeout from ever firing
                await asyncio.sleep(0.2)
                if reader.at_eof():
                    break
                try:
                    writer.write(b"X-Drip: 1\r\n")
                    await writer.drain()
                except ConnectionError:
                    break
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert time.perf_counter() - started < 2.5
            writer.close()

            reader, writer = await _raw_connection(address)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 408"), head
            writer.close()
            async with session.get("/healthz") as response:
                assert response.status == 200
        assert service.calls == []

    run(scenario())


# --- streams end on every error path ---------------------------------------------------------------

@pytest.mark.parametrize("failure, code", [
    (EngineDown("the engine process exited"), "engine_unavailable"),
    (NonFiniteLogits(7), "non_finite_logits"),
    (RuntimeError("a bug with a secret path /root/key"), 500),
])
def test_a_stream_that_fails_after_its_headers_ends_with_an_error_event(failure, code):
    async def scenario():
        service = RecordingService(stream_failure=failure)
        async with serving(service) as (session, _):
            async with session.post(CHAT, json={**GOOD_CHAT, "stream": True}) as response:
                assert response.status == 200
                text = await asyncio.wait_for(response.text(), 10)  # returns: the stream is closed
        events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == code
        assert "secret" not in text

    run(scenario())


def test_engine_errors_map_through_the_one_table():
    from longtail.node.errors import error_body, mapping_for

    too_long = PromptTooLong(300, 10, 256)
    assert mapping_for(too_long).status == 400
    assert error_body(too_long)["error"]["code"] == "prompt_too_long"
    assert mapping_for(EngineDown("x")).status == 503
    assert error_body(KeyError("secret"))["error"]["message"] == "internal error"


# --- /metrics ---------------------------------------------------------------------------------------

def test_metrics_content_type_and_exact_earnings():
    from prometheus_client import CONTENT_TYPE_LATEST

    async def scenario():
        service = RecordingService()
        service.stats.earnings.inc(2**53 + 1)
        service.stats.earnings.inc(10**24)
        async with serving(service) as (session, _):
            async with session.get("/metrics") as response:
                assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
                assert "version=" in response.headers["Content-Type"] and "charset=utf-8" in \
                    response.headers["Content-Type"]
                text = await response.text()
        assert f"longtail_earnings_open_units_total {2**53 + 1 + 10**24}\n" in text
        from prometheus_client.parser import text_string_to_metric_families

        names = {family.name for family in text_string_to_metric_families(text)}
        assert "longtail_earnings_open_units" in names

    run(scenario())
