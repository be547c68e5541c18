"""The node's typed errors and the one table that maps every error to an HTTP status.

Handlers raise domain errors; the middleware in `api.py` turns them into
OpenAI-shaped bodies: `{"error": {"message", "type", "code", ...details}}`.
"""

from __future__ import annotations

import dataclasses


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


class EngineDown(NodeError):
    """The engine's process is gone or restarting: nothing generates until a new one is up (serving.engine_process)."""

    code = "engine_unavailable"


@dataclasses.dataclass(frozen=True)
class ErrorMapping:
    status: int
    type: str


# The one table: every client-visible error class and its status code.
HTTP_ERRORS: dict[type[NodeError], ErrorMapping] = {
    BadRequest: ErrorMapping(400, "invalid_request_error"),
    PromptTooLarge: ErrorMapping(400, "invalid_request_error"),
    InvalidVoucherSignature: ErrorMapping(401, "authentication_error"),
    PaymentRequired: ErrorMapping(402, "payment_required"),
    UnknownModel: ErrorMapping(404, "invalid_request_error"),
    NotFound: ErrorMapping(404, "invalid_request_error"),
    NodeBusy: ErrorMapping(429, "rate_limit_error"),
    ChainUnavailable: ErrorMapping(503, "service_unavailable"),
    EngineDown: ErrorMapping(503, "service_unavailable"),
}


def mapping_for(error: NodeError) -> ErrorMapping:
    for cls in type(error).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls]
    return ErrorMapping(500, "server_error")


def error_body(error: NodeError) -> dict:
    mapping = mapping_for(error)
    return {"error": {"message": error.message, "type": mapping.type, "code": error.code, **error.details}}
