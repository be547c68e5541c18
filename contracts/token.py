"""Typed calls to OpenToken: balances, transfers, the devnet faucet and EIP-2612 permit signatures."""

from __future__ import annotations

import dataclasses

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from web3 import Web3

from longtail.contracts.artifacts import load_artifact
from longtail.contracts.chain import send
from longtail.contracts.vouchers import EIP712_DOMAIN_FIELDS

PERMIT_FIELDS = [
    {"name": "owner", "type": "address"},
    {"name": "spender", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]


@dataclasses.dataclass(frozen=True)
class PermitSignature:
    """An EIP-2612 permit, signed off-chain by the token owner."""

    owner: str
    spender: str
    value: int
    deadline: int
    v: int
    r: bytes
    s: bytes


class OpenToken:
    """The OPEN ERC-20 at `address`."""

    def __init__(self, w3: Web3, address: str) -> None:
        self.w3 = w3
        self.address = address
        self.contract = w3.eth.contract(address=address, abi=load_artifact("OpenToken").abi)

    def balance_of(self, account: str) -> int:
        return self.contract.functions.balanceOf(account).call()

    def total_supply(self) -> int:
        return self.contract.functions.totalSupply().call()

    def allowance(self, owner: str, spender: str) -> int:
        return self.contract.functions.allowance(owner, spender).call()

    def nonce(self, owner: str) -> int:
        return self.contract.functions.nonces(owner).call()

    def transfer(self, sender: LocalAccount, to: str, amount: int) -> dict:
        return send(self.w3, sender, self.contract.functions.transfer(to, amount))

    def approve(self, owner: LocalAccount, spender: str, amount: int) -> dict:
        return send(self.w3, owner, self.contract.functions.approve(spender, amount))

    def ensure_allowance(self, owner: LocalAccount, spender: str, amount: int) -> None:
        """Approve `spender` for `amount` unless the current allowance already covers it."""
        if self.allowance(owner.address, spender) < amount:
            self.approve(owner, spender, amount)

    def mint(self, minter: LocalAccount, to: str, amount: int) -> dict:
        """Devnet faucet: `minter` must hold the mint role and minting must be open."""
        return send(self.w3, minter, self.contract.functions.mint(to, amount))

    def set_minter(self, admin: LocalAccount, account: str, allowed: bool) -> dict:
        return send(self.w3, admin, self.contract.functions.setMinter(account, allowed))

    def close_minting(self, admin: LocalAccount) -> dict:
        return send(self.w3, admin, self.contract.functions.closeMinting())

    def permit(self, sender: LocalAccount, permit: PermitSignature) -> dict:
        """Submit a signed permit (anyone may; the owner need not pay gas)."""
        return send(self.w3, sender, self.contract.functions.permit(
            permit.owner, permit.spender, permit.value, permit.deadline, permit.v, permit.r, permit.s))

    def sign_permit(self, owner: LocalAccount, spender: str, value: int, deadline: int,
                    nonce: int | None = None) -> PermitSignature:
        """Sign an EIP-2612 permit for this token on this chain (reads the owner's nonce unless given)."""
        typed = {
            "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS, "Permit": PERMIT_FIELDS},
            "primaryType": "Permit",
            "domain": {"name": "Open", "version": "1", "chainId": self.w3.eth.chain_id,
                       "verifyingContract": self.address},
            "message": {"owner": owner.address, "spender": spender, "value": value,
                        "nonce": self.nonce(owner.address) if nonce is None else nonce, "deadline": deadline},
        }
        signed = Account.sign_message(encode_typed_data(full_message=typed), owner.key)
        return PermitSignature(owner=owner.address, spender=spender, value=value, deadline=deadline, v=signed.v,
                               r=signed.r.to_bytes(32, "big"), s=signed.s.to_bytes(32, "big"))

    def transfers(self, from_block: int = 0, **filters) -> list[dict]:
        """Transfer events (argument filters: from, to)."""
        return [dict(e["args"]) for e in self.contract.events.Transfer().get_logs(
            from_block=from_block, argument_filters=filters or None)]
