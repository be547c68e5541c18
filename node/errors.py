"""The node's typed errors and the one table that maps every error to an HTTP status.

Handlers raise domain errors; the middleware in `api.py` turns them into
OpenAI-shaped bodies: `{"error": {"message", "type", "code", ...details}}`.
"""

from __future__ import annotations

import dataclasses

from longtail.serving import errors as engine


class NodeError(Exception):
    """Base of errors a client can cause; `details` travel in the response body."""

    code = "node_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(NodeError):
    code = "invalid_request"


class PromptTooLarge(BadRequest):
    code = "prompt_too_large"


class PayloadTooLarge(NodeError):
    """The body is over the node's size limit; nothing of it was parsed."""

    code = "payload_too_large"


class RequestTimeout(NodeError):
    """The client did not send its body within the node's deadline (a slow or stalled client)."""

    code = "request_timeout"


class Unsupported(BadRequest):
    """A valid OpenAI parameter this node does not implement (e.g. n > 1): refused, never silently ignored."""

    code = "unsupported_parameter"


class UnknownModel(NodeError):
    code = "model_not_found"


class PaymentRequired(NodeError):
    """The voucher is missing or short, or the channel's deposit cannot cover the request."""

    code = "payment_required"


class InvalidVoucherSignature(NodeError):
    code = "invalid_signature"


class NodeBusy(NodeError):
    code = "node_busy"


class ChainUnavailable(NodeError):
    code = "chain_unavailable"


class NotFound(NodeError):
    code = "not_found"


class AdapterUnavailable(NodeError):
    """An adapter id this node does not hold could not be brought from a peer right now (peers failing)."""

    code = "adapter_unavailable"


class AdapterOwnerConflict(NodeError):
    """The adapter's on-chain registration names another owner or other Datanet shares than its config declares
    (an adapterId squatted, issue 20 attack 5), or a registered adapter declares none: not served for pay."""

    code = "adapter_owner_conflict"


class StorageUnavailable(NodeError):
    """The receipt store cannot write (disk full, database gone): no answer leaves without its durable receipt."""

    code = "storage_unavailable"


class OperatorOnly(NodeError):
    """Adding or deleting adapters needs the operator's token, and this request did not carry it."""

    code = "operator_token_required"


class OperatorTokenUnset(NodeError):
    """Adapter management is off: the operator set no token (node config `operator_token_env`)."""

    code = "adapter_management_disabled"


class EngineDown(NodeError):
    """The engine's process is gone or restarting: nothing generates until a new one is up (serving.engine_process)."""

    code = "engine_unavailable"


@dataclasses.dataclass(frozen=True)
class ErrorMapping:
    status: int
    type: str


# The one table: every client-visible error class and its status code. The engine's typed errors are here too: each
# fails one request for a reason the client can read, so none of them is a 500 ("internal error").
HTTP_ERRORS: dict[type[Exception], ErrorMapping] = {
    BadRequest: ErrorMapping(400, "invalid_request_error"),
    PromptTooLarge: ErrorMapping(400, "invalid_request_error"),
    Unsupported: ErrorMapping(400, "invalid_request_error"),
    RequestTimeout: ErrorMapping(408, "invalid_request_error"),
    PayloadTooLarge: ErrorMapping(413, "invalid_request_error"),
    InvalidVoucherSignature: ErrorMapping(401, "authentication_error"),
    OperatorOnly: ErrorMapping(401, "authentication_error"),
    OperatorTokenUnset: ErrorMapping(403, "permission_error"),
    PaymentRequired: ErrorMapping(402, "payment_required"),
    UnknownModel: ErrorMapping(404, "invalid_request_error"),
    NotFound: ErrorMapping(404, "invalid_request_error"),
    AdapterOwnerConflict: ErrorMapping(409, "invalid_request_error"),
    NodeBusy: ErrorMapping(429, "rate_limit_error"),
    ChainUnavailable: ErrorMapping(503, "service_unavailable"),
    AdapterUnavailable: ErrorMapping(503, "service_unavailable"),
    StorageUnavailable: ErrorMapping(503, "service_unavailable"),
    EngineDown: ErrorMapping(503, "service_unavailable"),
    engine.PromptTooLong: ErrorMapping(400, "invalid_request_error"),
    engine.InvalidSamplingParams: ErrorMapping(400, "invalid_request_error"),
    engine.InvalidTokenIds: ErrorMapping(400, "invalid_request_error"),
    engine.KvCacheTooSmall: ErrorMapping(400, "invalid_request_error"),
    engine.UnknownAdapter: ErrorMapping(404, "invalid_request_error"),  # AdapterRemoved too: new requests 404
    engine.AdapterIncompatible: ErrorMapping(400, "invalid_request_error"),
    engine.AdapterTooLarge: ErrorMapping(400, "invalid_request_error"),
    engine.AdapterInUse: ErrorMapping(409, "invalid_request_error"),
    # No room right now / a load that may succeed later: 503 with Retry-After (the class says how long).
    engine.AdapterSlotsFull: ErrorMapping(503, "service_unavailable"),
    engine.AdapterLoadFailed: ErrorMapping(503, "service_unavailable"),
    engine.RequestCancelled: ErrorMapping(499, "request_cancelled"),
    engine.EngineUnavailable: ErrorMapping(503, "service_unavailable"),
    # The model itself failed on this request (NaN logits, a sampler that could not draw): the node's fault, said so.
    engine.NonFiniteLogits: ErrorMapping(500, "server_error"),
    engine.SamplingFailed: ErrorMapping(500, "server_error"),
}

_SERVER_ERROR = ErrorMapping(500, "server_error")


def mapping_for(error: BaseException) -> ErrorMapping:
    for cls in type(error).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls]
    return _SERVER_ERROR


def retry_after(error: BaseException) -> int | None:
    """Seconds for the Retry-After header of a "not now" error (429/503), from its details or its class."""
    value = error.details.get("retry_after_seconds") if isinstance(error, NodeError) else None
    if value is None:
        value = getattr(error, "retry_after_seconds", None)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def is_known(error: BaseException) -> bool:
    """True for an error the table names (its message is meant for the client); False for a bug."""
    return any(cls in HTTP_ERRORS for cls in type(error).__mro__)


def _code_of(error: BaseException) -> str:
    if isinstance(error, NodeError):
        return error.code
    return "".join("_" + c.lower() if c.isupper() else c for c in type(error).__name__).lstrip("_")


def error_body(error: BaseException) -> dict:
    """The OpenAI-shaped body of a known error; anything else is "internal error", its details kept out."""
    mapping = mapping_for(error)
    if isinstance(error, NodeError):
        return {"error": {"message": error.message, "type": mapping.type, "code": error.code, **error.details}}
    if is_known(error):
        # An engine error's own numbers (PromptTooLong: the limit) travel beside the message.
        details = getattr(error, "details", None)
        extra = dict(details) if isinstance(details, dict) else {}
        return {"error": {"message": str(error), "type": mapping.type, "code": _code_of(error), **extra}}
    return {"error": {"message": "internal error", "type": "server_error", "code": 500}}
