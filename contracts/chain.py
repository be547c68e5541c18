"""Sending transactions and reading reverts: the one place that talks to a node's JSON-RPC for writes.

Transactions are signed locally with the sender's key (works against anvil and any real chain). A
revert surfaces as `ContractRevert` carrying the custom error's name and decoded arguments, so callers
and tests match on `error.name == "VoucherNotIncreasing"` instead of parsing strings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError, ContractPanicError
from web3.logs import DISCARD

from longtail.contracts.artifacts import load_all

ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
PANIC_SELECTOR = bytes.fromhex("4e487b71")  # Panic(uint256)


class ChainError(RuntimeError):
    """A chain call failed for a reason other than a contract revert."""


class ContractRevert(ChainError):
    """A contract reverted: `name` is the custom error (or "Error"/"Panic"), `args` its decoded values."""

    def __init__(self, name: str, args: Mapping[str, Any], data: bytes) -> None:
        rendered = ", ".join(f"{key}={_render(value)}" for key, value in args.items())
        super().__init__(f"{name}({rendered})")
        self.name = name
        self.args_by_name = dict(args)
        self.data = data


class TransactionFailed(ChainError):
    """A mined transaction has status 0 although its gas estimate passed (state moved in between)."""

    def __init__(self, tx_hash: str, gas_used: int) -> None:
        super().__init__(f"transaction {tx_hash} reverted on chain after using {gas_used} gas")
        self.tx_hash = tx_hash
        self.gas_used = gas_used


@dataclasses.dataclass(frozen=True)
class ErrorSpec:
    name: str
    input_names: tuple[str, ...]
    input_types: tuple[str, ...]


@functools.cache
def error_table() -> dict[bytes, ErrorSpec]:
    """Every custom error in the compiled contracts by 4-byte selector."""
    table: dict[bytes, ErrorSpec] = {}
    for artifact in load_all().values():
        for item in artifact.abi:
            if item["type"] != "error":
                continue
            types = tuple(_abi_type(i) for i in item["inputs"])
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            table[selector] = ErrorSpec(item["name"], tuple(i["name"] for i in item["inputs"]), types)
    return table


def decode_revert(data: bytes | str) -> ContractRevert:
    """Turn raw revert data into a ContractRevert naming the error."""
    raw = bytes(HexBytes(data)) if data else b""
    selector, body = raw[:4], raw[4:]
    if selector == ERROR_STRING_SELECTOR:
        return ContractRevert("Error", {"message": abi_decode(["string"], body)[0]}, raw)
    if selector == PANIC_SELECTOR:
        return ContractRevert("Panic", {"code": abi_decode(["uint256"], body)[0]}, raw)
    spec = error_table().get(selector)
    if spec is None:
        return ContractRevert("UnknownRevert", {"data": raw.hex()}, raw)
    values = [to_checksum_address(v) if kind == "address" else v
              for kind, v in zip(spec.input_types, abi_decode(list(spec.input_types), body), strict=True)]
    return ContractRevert(spec.name, dict(zip(spec.input_names, values, strict=True)), raw)


def send(w3: Web3, sender: LocalAccount, call: ContractFunction, value: int = 0) -> dict:
    """Sign and send `call` from `sender`, wait for it, and return the receipt; reverts raise ContractRevert."""
    try:
        tx = call.build_transaction({
            "from": sender.address,
            "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
            "chainId": w3.eth.chain_id,
            "value": value,
        })
    except ContractCustomError as error:
        raise decode_revert(error.data) from None
    except ContractPanicError as error:
        raise decode_revert(error.data) from None
    except ContractLogicError as error:
        raise decode_revert(error.data or b"") from None
    signed = sender.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60, poll_latency=0.05)
    if receipt["status"] != 1:
        raise TransactionFailed(tx_hash.to_0x_hex(), receipt["gasUsed"])
    return receipt


def event_args(event: Any, receipt: dict) -> list[dict]:
    """Arguments of every `event` (e.g. `contract.events.Claimed()`) emitted in `receipt`; other logs are skipped."""
    return [dict(log["args"]) for log in event.process_receipt(receipt, errors=DISCARD)]


def call_view(call: ContractFunction) -> Any:
    """Run a view call; reverts raise ContractRevert."""
    try:
        return call.call()
    except (ContractCustomError, ContractPanicError) as error:
        raise decode_revert(error.data) from None
    except ContractLogicError as error:
        raise decode_revert(error.data or b"") from None


def to_bytes32(value: str | bytes) -> bytes:
    """A 32-byte id from its 0x-hex form (docs/interfaces.md) or raw bytes."""
    raw = bytes(HexBytes(value))
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}: {value!r}")
    return raw


def hex32(value: bytes) -> str:
    """The 0x-prefixed lowercase hex form of a 32-byte id."""
    return "0x" + bytes(value).hex()


def checksum(address: str) -> str:
    return to_checksum_address(address)


def _abi_type(item: dict) -> str:
    if item["type"].startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in item["components"])
        return f"({inner}){item['type'][5:]}"
    return item["type"]


def _render(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
