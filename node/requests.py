"""The HTTP edge's records: an OpenAI-style request parsed and bounded, and the payment headers."""

from __future__ import annotations

import dataclasses
import math

from longtail.node.errors import BadRequest, Unsupported
from longtail.node.payments import Voucher

CHANNEL_HEADER = "X-Longtail-Channel"
VOUCHER_AMOUNT_HEADER = "X-Longtail-Voucher-Amount"
VOUCHER_SIGNATURE_HEADER = "X-Longtail-Voucher-Signature"
RECEIPT_HEADER = "X-Longtail-Receipt"


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """One inference job as the engine needs it, whichever endpoint it came through."""

    model: str
    prompt: str | None
    messages: tuple[dict, ...] | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    logprobs: bool
    chat: bool
    user: str | None = None
    include_usage: bool = False  # stream_options.include_usage: a last chunk with empty choices and the usage


INT64 = (-(2**63), 2**63 - 1)  # OpenAI's seed is an int64; torch's generator takes it as is
_CHAT_ROLES = {"system", "user", "assistant", "developer"}


def _number(body: dict, key: str, kind: type, default, low, high):
    """A finite number in [low, high]; for an int parameter an integral value (5 or 5.0, never 5.5 or 1e400)."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number", param=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number", param=key)
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise BadRequest(f"{key} must be an integer", param=key)
        value = int(value)
    # Compared before any conversion: a 300-digit integer is out of range, not an OverflowError.
    if not low <= value <= high:
        shown = value if abs(value) < 10**30 else f"{str(value)[:12]}..."
        raise BadRequest(f"{key}={shown} is outside [{low}, {high}]", param=key)
    return kind(value)


def _flag(body: dict, key: str, default: bool = False) -> bool:
    """A JSON boolean: `"stream": "false"` is a string, and reading it as true would surprise its sender."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false", param=key)
    return value


def _message_content(content: object) -> str:
    """A chat message's text: a string, or OpenAI's list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Unsupported(f"message content part of type {kind!r} is not supported; this node reads "
                                  "text parts only", param="messages")
            if not isinstance(part.get("text"), str):
                raise BadRequest("a text part needs a string text", param="messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest("message content must be a string or a non-empty list of text parts", param="messages")


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """OpenAI parameters this node does not implement: a clear 400 instead of an answer that ignores them."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise Unsupported("n must be 1: this node returns one choice per request", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise Unsupported("best_of must be 1", param="best_of")
    if chat:
        if body.get("top_logprobs") not in (None, 0):
            raise Unsupported("top_logprobs is not offered: the engine gives the sampled token's log-probability "
                              "only (logprobs: true)", param="top_logprobs")
    elif body.get("logprobs") is not None and body.get("logprobs") is not False:  # 0 too (`0 in (False,)` holds)
        raise Unsupported("logprobs on /v1/completions are not offered; /v1/chat/completions takes logprobs: true",
                          param="logprobs")
    if body.get("echo") not in (None, False):
        raise Unsupported("echo is not supported", param="echo")
    if body.get("suffix") not in (None, ""):
        raise Unsupported("suffix is not supported", param="suffix")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
            raise BadRequest("response_format must be an object with a type", param="response_format")
        if response_format["type"] != "text":
            raise Unsupported(f"response_format {response_format['type']!r} is not supported: this node has no "
                              "constrained decoding; ask for JSON in the prompt and send type 'text'",
                              param="response_format")
    for key in ("tools", "functions", "logit_bias"):
        if body.get(key):
            raise Unsupported(f"{key} is not supported by this node", param=key)
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise Unsupported(f"{key} is not supported by this node", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, float, 0.0, -2.0, 2.0) != 0.0:
            raise Unsupported(f"{key} is not supported by this node; send 0", param=key)


def parse_completion(body: object, chat: bool, max_tokens_limit: int) -> CompletionRequest:
    """Validate an OpenAI completions / chat completions body; every error names the parameter."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required: an adapter name or id, or the base model's name", param="model")
    prompt = messages = None
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise BadRequest("messages must be a non-empty list", param="messages")
        for message in raw:
            if not isinstance(message, dict) or message.get("role") not in _CHAT_ROLES:
                raise BadRequest("each message needs a role (system|user|assistant|developer) and content",
                                 param="messages")
        # developer is OpenAI's newer name for system; the chat template knows only system.
        messages = tuple({"role": "system" if m["role"] == "developer" else m["role"],
                          "content": _message_content(m.get("content"))} for m in raw)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string", param="prompt")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or up to 4 strings", param="stop")
    _refuse_unsupported(body, chat)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest("seed must be an integer", param="seed")
        if not INT64[0] <= seed <= INT64[1]:
            raise BadRequest("seed must fit in 64 bits (int64)", param="seed")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadRequest("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object", param="stream_options")
        include_usage = _flag(options, "include_usage")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise BadRequest("user must be a string of at most 256 characters", param="user")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    return CompletionRequest(
        model=model,
        prompt=prompt,
        messages=messages,
        max_tokens=_number(body, key, int, min(64, max_tokens_limit), 1, max_tokens_limit),
        temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0),
        top_k=_number(body, "top_k", int, 0, 0, 1000),
        seed=seed,
        stop=tuple(stop),
        stream=stream,
        logprobs=_flag(body, "logprobs") if chat else False,
        chat=chat,
        user=user,
        include_usage=include_usage,
    )


def parse_payment_headers(headers) -> tuple[str | None, Voucher | None]:
    """The channel id and (optional) voucher a request carries in its headers."""
    channel = headers.get(CHANNEL_HEADER)
    if channel is not None and not _is_bytes32(channel):
        raise BadRequest(f"{CHANNEL_HEADER} must be a 0x-prefixed 32-byte hex id")
    amount = headers.get(VOUCHER_AMOUNT_HEADER)
    signature = headers.get(VOUCHER_SIGNATURE_HEADER)
    if amount is None and signature is None:
        return (channel.lower() if channel else None), None
    if channel is None or amount is None or signature is None:
        raise BadRequest(f"a voucher needs {CHANNEL_HEADER}, {VOUCHER_AMOUNT_HEADER} and {VOUCHER_SIGNATURE_HEADER}")
    return channel.lower(), parse_voucher({"channel_id": channel, "cumulative_amount": amount, "signature": signature})


def parse_voucher(body: object) -> Voucher:
    if not isinstance(body, dict):
        raise BadRequest("a voucher is a JSON object {channel_id, cumulative_amount, signature}")
    channel, amount, signature = body.get("channel_id"), body.get("cumulative_amount"), body.get("signature")
    if not isinstance(channel, str) or not _is_bytes32(channel):
        raise BadRequest("channel_id must be a 0x-prefixed 32-byte hex id", param="channel_id")
    try:
        amount = int(str(amount))
    except ValueError:
        raise BadRequest("cumulative_amount must be an integer (OPEN base units)", param="cumulative_amount") from None
    if amount < 0 or amount >= 2**256:
        raise BadRequest("cumulative_amount is out of range", param="cumulative_amount")
    if not isinstance(signature, str) or not signature.startswith("0x") or len(signature) != 132:
        raise BadRequest("signature must be a 65-byte 0x-hex signature", param="signature")
    return Voucher(channel_id=channel.lower(), cumulative_amount=amount, signature=signature.lower())


def _is_bytes32(value: str) -> bool:
    if not value.startswith("0x") or len(value) != 66:
        return False
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        return False
    return True
