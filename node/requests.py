"""The HTTP edge's records: an OpenAI-style request parsed and bounded, and the payment headers."""

from __future__ import annotations

import dataclasses

from longtail.node.errors import BadRequest
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


def _number(body: dict, key: str, kind: type, default, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number", param=key)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"{key}={value} is outside [{low}, {high}]", param=key)
    return value


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
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                    or message.get("role") not in {"system", "user", "assistant"}:
                raise BadRequest("each message needs a role (system|user|assistant) and string content",
                                 param="messages")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in raw)
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
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer", param="seed")
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
        stream=bool(body.get("stream", False)),
        logprobs=bool(body.get("logprobs", False)),
        chat=chat,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
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
