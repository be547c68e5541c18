"""The operator's key at rest: an eth-account (Web3 Secret Storage) keystore, never plaintext.

One secp256k1 key is the node's chain address and, through py-libp2p, its peer id.
The private key is held in memory only by `NodeKey`, whose repr never shows it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from eth_account import Account


class KeystoreError(RuntimeError):
    """The keystore is missing, unreadable, or the password does not open it."""


@dataclasses.dataclass(frozen=True)
class NodeKey:
    """An unlocked key; `private_key` is excluded from repr so it never reaches a log."""

    address: str
    private_key: bytes = dataclasses.field(repr=False)


def create_keystore(path: Path, password: str, private_key: bytes | None = None) -> NodeKey:
    """Encrypt a new (or given) key into `path` with scrypt; the file is readable by its owner only."""
    account = Account.from_key(private_key) if private_key else Account.create()
    encrypted = Account.encrypt(account.key, password)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(encrypted, handle)
    temporary.replace(path)
    return NodeKey(address=account.address, private_key=bytes(account.key))


def load_keystore(path: Path, password: str) -> NodeKey:
    try:
        encrypted = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise KeystoreError(f"cannot read keystore {path}: {type(error).__name__}") from None
    try:
        private_key = Account.decrypt(encrypted, password)
    except ValueError:
        # The library's message is fine, but we never echo anything derived from the secret.
        raise KeystoreError(f"wrong password for keystore {path}") from None
    return NodeKey(address=Account.from_key(private_key).address, private_key=bytes(private_key))


def load_or_create(path: Path, password: str, private_key: bytes | None = None) -> NodeKey:
    """Open the keystore at `path`, creating it (from `private_key` if given) on first run."""
    if Path(path).exists():
        key = load_keystore(path, password)
        if private_key is not None and key.private_key != private_key:
            raise KeystoreError(f"keystore {path} holds another key than the one supplied")
        return key
    return create_keystore(Path(path), password, private_key)
